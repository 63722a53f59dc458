"""Softmax collapse: samples whose softmax has rounded to exactly one-hot, and how close the rest are.

Prieto et al. (2025, "Grokking at the Edge of Numerical Stability") describe how a network
trained past 100% training accuracy without regularization keeps scaling up its logits. The
gradient then points along the naive-loss-minimization (NLM) direction, which only multiplies
the logits. In time the softmax of more and more samples rounds to one-hot in floating point,
and those samples give an exact zero loss and gradient, which stalls learning.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from stabcheck.analyzers.base import AnalysisContext, Analyzer, AnalyzerResult, finite_or_none
from stabcheck.engine.hvp import module_blocks
from stabcheck.engine.objective import cross_entropy_per_example, mse_per_example
from stabcheck.engine.precision import DTYPES, collapse_margin, collapsed, top_two_margin

# Share of collapsed samples above which the report lists the remedies from the source paper.
MATERIAL_SHARE = 0.01
QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)
HISTOGRAM_BINS = 40
# Examples per forward pass when computing the logits.
LOGIT_BATCH = 1024


class SoftmaxCollapseAnalyzer(Analyzer):
    id = "softmax-collapse"
    title = "Softmax collapse (floating-point precision)"
    cost = "cheap"
    reference = "Prieto et al. 2025, Grokking at the Edge of Numerical Stability"
    metric_names = (
        "sc_fraction",
        "sc_fraction_by_dtype",
        "zero_loss_fraction",
        "logit_gap",
        "headroom_by_dtype",
        "nlm_alignment",
    )
    structured_metrics = ("sc_fraction_by_dtype", "logit_gap", "headroom_by_dtype", "nlm_alignment")
    worse_when = {"sc_fraction": "higher", "zero_loss_fraction": "higher"}
    interpretation = {
        "sc_fraction": (
            "Share of analyzed samples whose softmax is exactly one-hot in the dtype of the training loss "
            "(--loss-dtype, default float32), so their loss and gradient are exactly 0 and they no longer "
            "train (Prieto et al. 2025)."
        ),
        "sc_fraction_by_dtype": "The same share if the loss ran in float16, bfloat16, float32 or float64, from the same logits.",
        "zero_loss_fraction": "Share of per-sample cross-entropy losses that are exactly 0 in the loss dtype.",
        "logit_gap": "Distribution of the margin between each sample's two largest logits (quantiles).",
        "headroom_by_dtype": (
            "How far each sample's top-two margin is below the margin at which a dtype collapses "
            "(ln(2/eps): about 5.5 bfloat16, 7.6 float16, 16.6 float32, 36.7 float64): minimum, median "
            "and the share already past it. Shows whether training in bfloat16 would collapse a run that "
            "is fine in float32."
        ),
        "nlm_alignment": (
            "Cosine between the negative full-batch gradient and the weights: near 1 means the update "
            "mostly scales the weights up, the naive-loss-minimization direction that only sharpens the "
            "softmax (Prieto et al. 2025)."
        ),
    }
    limits = (
        "The margin rule counts one runner-up logit; with several near the top a sample needs a larger margin, "
        "and sc_fraction_by_dtype, which sums all logits, is the exact count.",
        "Other dtypes are simulated by casting the analysis dtype's logits, not by running the model in them.",
        "nlm_alignment uses the data loss without weight decay.",
    )

    def skip_reason(self, context: AnalysisContext) -> str | None:
        if context.data.labels is None:
            return "softmax-collapse needs class labels (integer targets or one-hot targets)"
        if context.objective.loss_fn is mse_per_example:
            return "softmax-collapse concerns a softmax cross-entropy loss, and this run uses mse"
        return None

    def run(self, context: AnalysisContext) -> AnalyzerResult:
        objective = context.objective
        classes = context.data.num_classes or 1
        shortfall = context.budget_shortfall(
            {
                "the logits and their casts to four dtypes": objective.num_samples * classes * 32,
                "one gradient over the analysis set": context.activation_bytes(objective.num_samples, with_graph=True),
            },
            None,
        )
        if shortfall is not None:
            return AnalyzerResult.skipped(shortfall)
        logits = _logits(context)
        if logits.dim() != 2 or logits.shape[1] < 2:
            return AnalyzerResult.skipped(
                f"softmax-collapse needs logits shaped [samples, classes], and the model returns {tuple(logits.shape)}"
            )
        loss_dtype = context.estimator.loss_dtype
        labels = context.data.labels.to(logits.device)
        losses = torch.nn.functional.cross_entropy(logits.to(DTYPES[loss_dtype]), labels, reduction="none")
        group = objective.group
        if group.is_distributed:
            counts = _shares_over_ranks(logits, labels, losses, group)
            by_dtype = {name: counts[name] for name in DTYPES}
            zero_loss_fraction, train_accuracy = counts["zero_loss"], counts["correct"]
            margins = group.gather_rows(top_two_margin(logits))
        else:
            by_dtype = {name: float(collapsed(logits, dtype).double().mean()) for name, dtype in DTYPES.items()}
            zero_loss_fraction = float((losses == 0).double().mean())
            train_accuracy = float((logits.argmax(dim=1) == labels).double().mean())
            margins = top_two_margin(logits)

        notes: list[str] = []
        if context.objective.loss_fn is not cross_entropy_per_example:
            notes.append("the loss is a custom spec; the collapse counts assume that it applies a softmax to these outputs")
        sc_fraction = by_dtype[loss_dtype]
        if sc_fraction >= MATERIAL_SHARE:
            remedies = ["StableMax in place of softmax", "the orthogonal-gradient optimizer, which removes the gradient's component along the weights"]
            if loss_dtype != "float64":
                remedies.insert(0, "computing the loss in float64")
            notes.append(
                f"softmax collapse is material (at least {MATERIAL_SHARE:.0%} of the samples in the loss dtype "
                f"{loss_dtype}). Remedies that Prieto et al. (2025) describe, listed for information and not tested "
                f"on this run: {'; '.join(remedies)}"
            )
        analysis_dtype = str(objective.dtype).removeprefix("torch.")
        if DTYPES[loss_dtype].is_floating_point and torch.finfo(DTYPES[loss_dtype]).bits > torch.finfo(objective.dtype).bits:
            notes.append(
                f"the logits come from a {analysis_dtype} forward pass and are cast to the loss dtype {loss_dtype}; "
                f"run with --dtype {loss_dtype} to compute them at that precision"
            )
        alignment, per_layer = _nlm_alignment(context)
        metrics = {
            "sc_fraction": sc_fraction,
            "sc_fraction_by_dtype": by_dtype,
            "zero_loss_fraction": zero_loss_fraction,
            "logit_gap": _distribution(margins),
            "headroom_by_dtype": _headroom(margins),
            "nlm_alignment": {"overall": finite_or_none(alignment), "per_layer": per_layer},
        }
        if alignment is None:
            notes.append("the full-batch gradient or the weights are zero, so nlm_alignment is undefined")
        diagnostics = {
            "loss_dtype": loss_dtype,
            "analysis_dtype": analysis_dtype,
            "num_samples": objective.total_samples,
            "num_classes": int(logits.shape[1]),
            "collapse_margin_by_dtype": {name: collapse_margin(dtype) for name, dtype in DTYPES.items()},
            "train_accuracy": train_accuracy,
        }
        return AnalyzerResult(status="ok", metrics=metrics, diagnostics=diagnostics, notes=tuple(notes))


def _shares_over_ranks(logits: torch.Tensor, labels: torch.Tensor, losses: torch.Tensor, group: Any) -> dict[str, float]:
    """Return the shares of collapsed samples per dtype, of zero losses and of correct predictions
    over the samples of every rank, from counts added over the ranks."""
    keys = [*DTYPES, "zero_loss", "correct"]
    local = [collapsed(logits, dtype).sum() for dtype in DTYPES.values()]
    local += [(losses == 0).sum(), (logits.argmax(dim=1) == labels).sum()]
    counts = group.sum_(torch.stack(local).to(torch.float64))
    total = group.sum_float(float(logits.shape[0]))
    return {key: float(count) / total for key, count in zip(keys, counts.tolist())}


def _logits(context: AnalysisContext) -> torch.Tensor:
    objective = context.objective
    parts = []
    with torch.no_grad():
        for start in range(0, objective.num_samples, LOGIT_BATCH):
            parts.append(objective.outputs(objective.point, objective.inputs[start : start + LOGIT_BATCH]))
    return torch.cat(parts)


def _distribution(values: torch.Tensor) -> dict[str, Any]:
    data = values.cpu().numpy()
    counts, edges = np.histogram(data, bins=HISTOGRAM_BINS)
    return {
        "quantiles": {f"p{round(q * 100)}": float(np.quantile(data, q)) for q in QUANTILES},
        "histogram": {"edges": [float(edge) for edge in edges], "counts": [int(count) for count in counts]},
    }


def _headroom(margins: torch.Tensor) -> dict[str, dict[str, float]]:
    result = {}
    for name, dtype in DTYPES.items():
        headroom = collapse_margin(dtype) - margins
        result[name] = {
            "collapse_margin": collapse_margin(dtype),
            "min": float(headroom.min()),
            "median": float(headroom.median()),
            "share_past": float((headroom <= 0).double().mean()),
        }
    return result


def _nlm_alignment(context: AnalysisContext) -> tuple[float | None, list[dict[str, Any]]]:
    """Return cos(-grad, theta) overall and per module, for the data loss without weight decay."""
    objective = context.objective
    names = list(objective.layout.names)
    params = {name: objective.point[name].detach().requires_grad_(True) for name in names}
    gradient = [torch.zeros_like(params[name]) for name in names]
    for inputs, targets in objective.chunks():
        loss = objective.chunk_loss(params, inputs, targets)
        grads = torch.autograd.grad(loss, [params[name] for name in names], allow_unused=True)
        gradient = [total + (g if g is not None else 0) for total, g in zip(gradient, grads)]
    if objective.group.is_distributed:
        gradient = [objective.group.sum_(piece) for piece in gradient]
    by_name = dict(zip(names, gradient))

    def cosine(keys: list[str]) -> float | None:
        g = torch.cat([by_name[key].reshape(-1) for key in keys]).double()
        w = torch.cat([objective.point[key].reshape(-1) for key in keys]).double()
        denominator = float(g.norm() * w.norm())
        return float(-(g @ w) / denominator) if denominator > 0 else None

    per_layer = [
        {"block": block, "cosine": finite_or_none(cosine(keys))} for block, keys in module_blocks(tuple(names)).items()
    ]
    return cosine(names), per_layer
