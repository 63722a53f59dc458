r"""Gradient coherence: how much the per-example gradients agree, overall, per class and per layer.

Chatterjee & Zielinski ("On the Generalization Mystery in Deep Learning", 2022) measure the
agreement of m per-example gradients :math:`g_i` by

.. math::

    \alpha = \frac{\lVert \frac{1}{m} \sum_i g_i \rVert^2}{\frac{1}{m} \sum_i \lVert g_i \rVert^2},
    \qquad m\alpha = \frac{\lVert \sum_i g_i \rVert^2}{\sum_i \lVert g_i \rVert^2},

so :math:`m\alpha` is 1 for pairwise orthogonal gradients and m for identical ones. Real labels
give much higher coherence than random labels early in training, which they offer as the reason
networks generalize. The gradient signal-to-noise ratio of parameter j, :math:`\bar g_j^2 /
\mathrm{Var}_i(g_{ij})` (Liu et al. 2020, "Understanding Why Neural Networks Generalize Well
Through GSNR of Parameters"), is averaged over the parameters.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from stabcheck.analyzers.base import (
    AnalysisContext,
    Analyzer,
    AnalyzerResult,
    finite_or_none,
)
from stabcheck.analyzers.opposing_signals import (
    MIN_GROUP_SIZE,
    OpposingPair,
    find_opposing_pairs,
)
from stabcheck.engine.hvp import module_blocks
from stabcheck.engine.memory import MemoryBudgetExceeded, default_budget, format_bytes
from stabcheck.engine.per_example import (
    COUPLED_MESSAGE,
    CoupledExamplesError,
    GradientPlan,
    GradientSums,
    estimate_memory,
    gradient_gram,
    gradient_sums,
    gram_bytes_per_example,
    make_plan,
)

# A parameter whose gradient variance is below this share of its mean squared gradient has a
# constant gradient over the examples, so its GSNR is undefined and it is left out of the mean.
CONSTANT_GRADIENT_SHARE = 1e-12
# A parameter whose root-mean-square gradient is below this many machine epsilons of the largest
# one's is numerically zero (such as a key bias, which softmax ignores), and its GSNR would be the
# ratio of two rounding errors.
ROUNDING_FLOOR_EPS = 100
# Minimum number of candidates for the opposing-signal search: two groups of MIN_GROUP_SIZE.
MIN_CANDIDATES = 2 * MIN_GROUP_SIZE
# Indices listed per group in the JSON report; the group's size is always exact.
MAX_LISTED_INDICES = 200


class GradientCoherenceAnalyzer(Analyzer):
    id = "gradient-coherence"
    title = "Gradient coherence"
    cost = "cheap"
    reference = (
        "Chatterjee & Zielinski 2022, On the Generalization Mystery in Deep Learning; Liu et al. 2020, "
        "Understanding Why Neural Networks Generalize Well Through GSNR of Parameters; Rosenfeld & "
        "Risteski 2023, Outliers with Opposing Signals Have an Outsized Effect on Neural Network Optimization"
    )
    metric_names = ("alpha", "m_coherence", "num_examples", "per_class", "gsnr")
    structured_metrics = ("per_class",)
    interpretation = {
        "alpha": (
            "|mean gradient|^2 over the mean squared per-example gradient norm: 1 when every example "
            "pulls the same way, about 1/m when their gradients are orthogonal."
        ),
        "m_coherence": (
            "m * alpha: 1 for orthogonal gradients, m for identical ones, below 1 when they cancel on "
            "average (their pairwise dot products sum to a negative number). Real labels give clearly higher "
            "values than random labels early in training (Chatterjee & Zielinski); values near or "
            "below 1 mean the examples no longer share a direction, as when a network memorizes."
        ),
        "num_examples": "m, the number of per-example gradients; compare coherence only at equal m.",
        "per_class": "alpha and m_coherence within each class: a class far below the rest is learned by memorizing.",
        "gsnr": (
            "Mean over parameters of the gradient signal-to-noise ratio, mean gradient^2 over its variance "
            "across examples (Liu et al 2020). Higher values went with better generalization in their experiments."
        ),
    }
    limits = (
        "Gradients are of the per-example loss only: coupled weight decay adds the same vector to "
        "every example and is left out.",
        "Coherence is exact for the analysis set; it changes with m, so compare runs at the same --max-samples.",
        "The model runs in eval mode, so BatchNorm uses running statistics and dropout is off; "
        "per-example gradients are undefined with batch statistics.",
        (
            "Opposing groups are searched only among the examples whose squared gradient norm is above "
            "the mean, at most --opposing-candidates of them, largest first."
        ),
    )

    def skip_reason(self, context: AnalysisContext) -> str | None:
        if context.objective.couples_examples:
            return (
                "per-example gradients are undefined when BatchNorm uses batch statistics, because "
                "each example's output then depends on the rest of its batch; use --model-mode eval"
            )
        return None

    def run(self, context: AnalysisContext) -> AnalyzerResult:
        settings = context.estimator
        objective = context.objective
        budget = context.memory_budget or settings.memory_budget or default_budget(objective.device)
        labels = context.data.labels
        group = objective.group
        failure: CoupledExamplesError | None = None
        try:
            plan = make_plan(objective, settings.per_example_method)
        except CoupledExamplesError as error:
            failure = error
        # Every rank skips when one does, or the others would wait in gradient_sums' reductions.
        if group.any_true(failure is not None):
            return AnalyzerResult.skipped(str(failure) if failure else f"on another process: {COUPLED_MESSAGE}")
        try:
            sums = gradient_sums(
                objective,
                groups=None if labels is None else labels,
                method=settings.per_example_method,
                memory_budget=budget,
                plan=plan,
            )
        except (MemoryBudgetExceeded, CoupledExamplesError) as error:
            return AnalyzerResult.skipped(str(error))
        # The per-example statistics now cover every rank's examples, in analysis-set order.
        labels = None if labels is None else group.gather_rows(labels)

        notes = list(sums.notes)
        total_sq = float(sums.sq_norms.sum())
        sum_sq = float(torch.dot(sums.sum_gradient, sums.sum_gradient))
        m = sums.num_examples
        if total_sq > 0:
            alpha, m_coherence = sum_sq / (m * total_sq), sum_sq / total_sq
        else:
            alpha = m_coherence = None
            notes.append("every per-example gradient is zero, so alpha and m_coherence are undefined")

        gsnr_parts = _gsnr_parts(sums.sum_gradient, sums.sum_squares, m, objective.layout, torch.finfo(objective.dtype).eps)
        gsnr = gsnr_parts.mean(objective.layout.names)
        constant = objective.dim - sum(gsnr_parts.counts.values())
        if constant:
            notes.append(
                f"{constant} of {objective.dim} parameters have the same gradient for every example, "
                "one at the rounding level of the dtype, or none, so their GSNR is undefined and gsnr "
                "averages over the rest"
            )
        per_class = _per_class(sums, labels, notes)
        if labels is None:
            notes.append("the targets are not class labels, so per_class is null")

        diagnostics: dict[str, Any] = {
            "mean_gradient_norm": finite_or_none(math.sqrt(sum_sq) / m),
            "mean_sq_gradient_norm": finite_or_none(total_sq / m),
            "per_example_methods": dict(Counter(sums.methods.values())),
            "chunk_size": sums.chunk_size,
            "num_chunks": sums.num_chunks,
            # The default budget follows the free memory, which changes between runs, so only a
            # budget the user set is recorded as a number.
            "memory_budget_bytes": settings.memory_budget,
            "bytes_per_example": sums.bytes_per_example,
            "dtype": str(objective.dtype).removeprefix("torch."),
            "per_layer": _per_layer(sums, objective.layout, gsnr_parts, context.model),
        }
        diagnostics["opposing_signals"] = _opposing_signals(context, plan, sums, budget, labels, notes)
        metrics = {
            "alpha": finite_or_none(alpha),
            "m_coherence": finite_or_none(m_coherence),
            "num_examples": m,
            "per_class": per_class,
            "gsnr": finite_or_none(gsnr),
        }
        return AnalyzerResult(status="ok", metrics=metrics, diagnostics=diagnostics, notes=tuple(notes))


@dataclass(frozen=True)
class _GsnrParts:
    """Per-parameter GSNR summed over each parameter tensor, with the count of defined values."""

    totals: dict[str, float]
    counts: dict[str, int]

    def mean(self, names: list[str] | tuple[str, ...]) -> float | None:
        count = sum(self.counts[name] for name in names)
        return sum(self.totals[name] for name in names) / count if count else None


def _gsnr_parts(
    sum_gradient: torch.Tensor, sum_squares: torch.Tensor, count: int, layout: Any, eps: float
) -> _GsnrParts:
    """Compute each parameter's GSNR, mean^2 / variance over the examples, summed per tensor.

    A parameter whose gradient is the same for every example (variance below
    CONSTANT_GRADIENT_SHARE of its mean square) has no GSNR and is not counted. Neither has one
    whose gradient is at the rounding level of the analysis dtype (``eps``), see ROUNDING_FLOOR_EPS.
    """
    # In-place steps keep the number of full-length temporaries low on large models.
    second_moment = sum_squares / count
    floor = (ROUNDING_FLOOR_EPS * eps) ** 2 * float(second_moment.max()) if second_moment.numel() else 0.0
    mean_sq = (sum_gradient / count).square_()
    variance = second_moment.sub_(mean_sq)
    varying = (variance > CONSTANT_GRADIENT_SHARE * (variance + mean_sq)) & (variance + mean_sq > floor)
    ratios = mean_sq.div_(variance.masked_fill_(~varying, 1.0)).masked_fill_(~varying, 0.0)
    totals, counts = {}, {}
    for name in layout.names:
        piece = layout.slice(name)
        totals[name] = float(ratios[piece].sum())
        counts[name] = int(varying[piece].sum())
    return _GsnrParts(totals, counts)


def _per_class(sums: GradientSums, labels: torch.Tensor | None, notes: list[str]) -> dict[str, Any] | None:
    if labels is None:
        return None
    labels = labels.cpu()
    sq_norms = sums.sq_norms.cpu()
    table: dict[str, Any] = {}
    single = []
    for label in sorted(sums.group_sq_norm_of_sum):
        members = labels == label
        count = int(members.sum())
        total_sq = float(sq_norms[members].sum())
        sum_sq = sums.group_sq_norm_of_sum[label]
        if count == 1:
            single.append(str(label))
        table[str(label)] = {
            "num_examples": count,
            "alpha": finite_or_none(sum_sq / (count * total_sq)) if total_sq > 0 else None,
            "m_coherence": finite_or_none(sum_sq / total_sq) if total_sq > 0 else None,
        }
    if single:
        notes.append(
            f"class(es) {', '.join(single)} have one example in the analysis set, so their alpha is 1 "
            "by definition; raise --max-samples"
        )
    return table


def _per_layer(sums: GradientSums, layout: Any, gsnr_parts: _GsnrParts, model: torch.nn.Module) -> list[dict[str, Any]]:
    rows = []
    count = sums.num_examples
    module_types = {name or "(root)": type(module).__name__ for name, module in model.named_modules()}
    for block, names in module_blocks(layout.names).items():
        pieces = [sums.sum_gradient[layout.slice(name)] for name in names]
        sum_sq = float(sum(torch.dot(piece, piece) for piece in pieces))
        total_sq = float(sums.block_sq_norms[block].sum())
        gsnr = gsnr_parts.mean(names)
        rows.append(
            {
                "block": block,
                "module_type": module_types.get(block),
                "num_parameters": sum(piece.numel() for piece in pieces),
                "alpha": finite_or_none(sum_sq / (count * total_sq)) if total_sq > 0 else None,
                "m_coherence": finite_or_none(sum_sq / total_sq) if total_sq > 0 else None,
                "gsnr": finite_or_none(gsnr),
                "mean_sq_gradient_norm": finite_or_none(total_sq / count),
            }
        )
    return rows


def _opposing_signals(
    context: AnalysisContext,
    plan: GradientPlan,
    sums: GradientSums,
    budget: int,
    labels: torch.Tensor | None,
    notes: list[str],
) -> dict[str, Any]:
    """Search the examples with the largest gradient norms for opposing groups, within the budget."""
    settings = context.estimator
    objective = context.objective
    if settings.opposing_groups == 0:
        return {"num_candidates": 0, "pairs": [], "skipped": "the search for opposing groups was turned off (--opposing-groups 0)"}

    sq_norms = sums.sq_norms.cpu()
    # Opposing signals are outliers: only examples with an above-average squared norm qualify.
    above_mean = int((sq_norms > 0).logical_and(sq_norms >= sq_norms.mean()).sum())
    requested = min(settings.opposing_candidates, above_mean)
    if sums.single_chunk is not None:
        fits = requested  # the Gram matrix comes from the chunk already in memory
    else:
        _, fixed = estimate_memory(objective, plan)
        fits = max(0, int((budget - fixed) // max(gram_bytes_per_example(objective, plan), 1)))
    # The ranks' budgets can differ (half of each one's free memory), and all need one count.
    count = objective.group.min_int(min(requested, fits))

    result: dict[str, Any] = {"num_candidates": count, "pairs": []}
    if count < MIN_CANDIDATES:
        result["num_candidates"] = 0
        result["skipped"] = (
            f"the search for opposing groups did not run: it needs {MIN_CANDIDATES} candidates, and "
            f"{requested} example(s) have an above-average gradient norm, of which {count} fit in the "
            f"memory budget of {format_bytes(budget)}"
        )
        notes.append(result["skipped"])
        return result
    if count < requested:
        notes.append(
            f"the opposing-signal search used the top {count} examples by gradient norm, not "
            f"{requested}, to stay within the memory budget of {format_bytes(budget)}"
        )

    candidates = torch.argsort(sq_norms, descending=True, stable=True)[:count]
    gram = gradient_gram(objective, candidates.to(objective.device), plan, sums)
    total_sq = float(sq_norms.sum())
    result["candidate_share_of_sq_norm"] = finite_or_none(float(sq_norms[candidates].sum()) / total_sq)
    for rank, pair in enumerate(find_opposing_pairs(gram, settings.opposing_groups), start=1):
        result["pairs"].append(_pair_json(rank, pair, candidates, sq_norms, total_sq, labels))
    return result


def _pair_json(
    rank: int,
    pair: OpposingPair,
    candidates: torch.Tensor,
    sq_norms: torch.Tensor,
    total_sq: float,
    labels: torch.Tensor | None,
) -> dict[str, Any]:
    groups = []
    shares = 0.0
    for rows, within in ((pair.first, pair.first_within_cosine), (pair.second, pair.second_within_cosine)):
        indices = candidates[rows.cpu()]
        norms = sq_norms[indices].sqrt()
        shares += float(sq_norms[indices].sum())
        order = torch.argsort(norms, descending=True, stable=True)
        listed = indices[order][:MAX_LISTED_INDICES]
        group: dict[str, Any] = {
            "size": len(rows),
            "indices": [int(i) for i in listed],
            "mean_gradient_norm": finite_or_none(float(norms.mean())),
            "within_cosine": finite_or_none(within),
        }
        if labels is not None:
            counts = Counter(int(label) for label in labels.cpu()[indices])
            group["classes"] = {str(label): n for label, n in sorted(counts.items())}
        groups.append(group)
    return {
        "rank": rank,
        "cosine": finite_or_none(pair.cosine),
        "share_of_sq_norm": finite_or_none(shares / total_sq) if total_sq > 0 else None,
        "groups": groups,
    }
