"""Neural collapse (NC1 to NC4) of the penultimate features, after Papyan, Han & Donoho 2020.

In the terminal phase of training, past zero training error, the penultimate features of each
class collapse to their class mean (NC1), and the class means form a simplex equiangular tight
frame (NC2). The classifier's rows align with those means (NC3), and the network's decision
becomes the nearest class mean (NC4).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from stabcheck.analyzers.base import AnalysisContext, Analyzer, AnalyzerResult, finite_or_none
from stabcheck.engine.collapse import CollapseAccumulator, collapse_metrics, nearest_class_mean
from stabcheck.errors import DataError, UsageError

# Examples per forward pass; the running sums keep memory independent of the number of samples.
FEATURE_BATCH = 1024


class FeatureLayerError(ValueError):
    """No Linear layer produces the model's output, so the classifier layer is unknown."""


class NeuralCollapseAnalyzer(Analyzer):
    id = "neural-collapse"
    title = "Neural collapse"
    cost = "cheap"
    reference = (
        "Papyan, Han & Donoho 2020, Prevalence of neural collapse during the terminal phase of deep "
        "learning training"
    )
    metric_names = (
        "nc1",
        "nc2_equinorm",
        "nc2_equiangularity",
        "nc2_etf_error",
        "nc3_self_duality",
        "nc4_ncc_mismatch",
        "feature_layer",
    )
    structured_metrics = ("feature_layer",)
    interpretation = {
        "nc1": (
            "Within-class spread of the penultimate features relative to the spread of the class means, "
            "tr(Sigma_W Sigma_B^+)/C. It falls toward 0 as training goes past zero error (Papyan et al. "
            "2020); a value that stays high means the features of a class stay spread out."
        ),
        "nc2_equinorm": "Coefficient of variation of the class-mean norms around the global mean; 0 when all are equal.",
        "nc2_equiangularity": "Mean |cos + 1/(C-1)| over pairs of centered class means; 0 for a simplex ETF.",
        "nc2_etf_error": "Frobenius distance between the normalized Gram matrix of the centered class means and that of a simplex ETF.",
        "nc3_self_duality": "Squared distance between the normalized classifier weights and the normalized centered class means; 0 when they align.",
        "nc4_ncc_mismatch": "Share of samples where the network's prediction differs from the nearest class mean of its features.",
        "feature_layer": "The classifier layer whose input is taken as the penultimate features.",
    }
    limits = (
        "NC1 divides by C, the global mean is the mean of the class means (not of the samples), and NC4 uses "
        "the plain nearest class mean without the classifier's bias; published implementations differ on each.",
        "NC3 needs a Linear classifier layer; for other layers it is null.",
        "The features are read in a first pass and NC4 needs a second one, so the model runs twice.",
    )

    def skip_reason(self, context: AnalysisContext) -> str | None:
        if context.data.labels is None:
            return "neural-collapse needs class labels (integer targets or one-hot targets)"
        return None

    def run(self, context: AnalysisContext) -> AnalyzerResult:
        objective = context.objective
        try:
            layer_name, layer, chosen_by = _classifier(context)
        except FeatureLayerError as error:
            return AnalyzerResult(status="error", notes=(str(error),))
        labels = context.data.labels.to(objective.device)
        group = objective.group
        num_classes = group.max_int(_class_count(labels, layer))
        # Split over several processes, the counts, sums and mismatches are added over the ranks.
        counts = group.sum_(torch.bincount(labels, minlength=num_classes))
        missing = [str(c) for c in range(num_classes) if int(counts[c]) == 0]
        if missing:
            raise DataError(
                f"neural-collapse: class(es) {', '.join(missing)} of the {num_classes} classes have no samples "
                "in the analysis set, so their means are undefined. Check the labels the data spec returns "
                "(and --max-samples, if set), or leave neural-collapse out of --analyzers."
            )

        width = layer.weight.shape[1] if isinstance(getattr(layer, "weight", None), torch.Tensor) else 0
        shortfall = context.budget_shortfall(
            {
                "the float64 class sums and scatter matrices": (num_classes * width + 2 * width * width) * 8,
                f"forward passes of {FEATURE_BATCH} examples": context.activation_bytes(FEATURE_BATCH, with_graph=False),
            },
            "analyze a narrower feature layer with --feature-layer",
        )
        if shortfall is not None:
            return AnalyzerResult.skipped(shortfall)

        accumulator = None
        for features, batch_labels, _ in _feature_batches(context, layer):
            if accumulator is None:
                accumulator = CollapseAccumulator(num_classes, features.shape[1], objective.device)
            accumulator.add(features, batch_labels)
        accumulator.reduce_(group)
        means = accumulator.means()
        weights = layer.weight.detach() if isinstance(layer, nn.Linear) and layer.weight.shape[0] == num_classes else None
        if weights is not None:
            weights = objective.point.get(f"{layer_name}.weight", weights)
        metrics = collapse_metrics(means, accumulator.within_covariance(), weights)

        mismatches = 0
        for features, _, outputs in _feature_batches(context, layer):
            predicted = outputs.reshape(outputs.shape[0], -1).argmax(dim=1)
            mismatches += int((predicted != nearest_class_mean(features, means)).sum())
        mismatches = group.sum_int(mismatches)

        notes = [f"features are the input of layer {layer_name!r} ({type(layer).__name__}), {chosen_by}"]
        single = [str(c) for c in range(num_classes) if int(counts[c]) == 1]
        if single:
            notes.append(f"class(es) {', '.join(single)} have one sample, so their within-class spread is 0 by construction")
        if metrics.nc2_equiangularity is None:
            notes.append(
                f"{num_classes} classes need {num_classes - 1} feature dimensions for a simplex ETF and the "
                f"features have {accumulator.dim}, so nc2_equiangularity and nc2_etf_error are null"
            )
        if weights is None:
            notes.append("the classifier layer is not a Linear layer with one row per class, so nc3_self_duality is null")
        result_metrics = {
            "nc1": finite_or_none(metrics.nc1),
            "nc2_equinorm": finite_or_none(metrics.nc2_equinorm),
            "nc2_equiangularity": finite_or_none(metrics.nc2_equiangularity),
            "nc2_etf_error": finite_or_none(metrics.nc2_etf_error),
            "nc3_self_duality": finite_or_none(metrics.nc3_self_duality),
            "nc4_ncc_mismatch": mismatches / objective.total_samples,
            "feature_layer": layer_name,
        }
        class_counts = {str(c): int(counts[c]) for c in range(num_classes)}
        diagnostics: dict[str, Any] = {
            "feature_layer_chosen_by": chosen_by,
            "feature_dim": accumulator.dim,
            "num_classes": num_classes,
            "class_counts": class_counts,
            "class_imbalance": max(class_counts.values()) / min(class_counts.values()),
            "accumulation_dtype": "float64",
        }
        return AnalyzerResult(status="ok", metrics=result_metrics, diagnostics=diagnostics, notes=tuple(notes))


def _class_count(labels: torch.Tensor, layer: nn.Module) -> int:
    """Return the number of classes: the largest label plus one, or the classifier's width if larger."""
    count = int(labels.max()) + 1
    if isinstance(layer, nn.Linear):
        count = max(count, layer.out_features)
    return count


def _classifier(context: AnalysisContext) -> tuple[str, nn.Module, str]:
    """Return the classifier layer: the one named in the settings, or the last Linear producing the logits."""
    modules = dict(context.model.named_modules())
    requested = context.estimator.feature_layer
    if requested:
        if requested not in modules:
            linear = [name for name, module in modules.items() if isinstance(module, nn.Linear)]
            raise UsageError(
                f"--feature-layer {requested!r} is not a module of the model; Linear modules: {', '.join(linear) or 'none'}"
            )
        return requested, modules[requested], "named with --feature-layer"

    outputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out)))
    objective = context.objective
    try:
        with torch.no_grad():
            logits = objective.outputs(objective.point, objective.inputs[:2])
    finally:
        for handle in handles:
            handle.remove()
    producing = [name for name, out in outputs.items() if out is logits or (out.shape == logits.shape and torch.equal(out, logits))]
    if not producing:
        raise FeatureLayerError(
            "no Linear layer produces the model's output directly, so the classifier layer is unknown; name it "
            "with --feature-layer module.path"
        )
    name = producing[-1]
    return name, modules[name], "found as the last Linear layer that produces the logits"


def _feature_batches(context: AnalysisContext, layer: nn.Module) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (input features of ``layer``, labels, model outputs) batch by batch."""
    objective = context.objective
    labels = context.data.labels.to(objective.device)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        for start in range(0, objective.num_samples, FEATURE_BATCH):
            captured.clear()
            with torch.no_grad():
                outputs = objective.outputs(objective.point, objective.inputs[start : start + FEATURE_BATCH])
            yield captured[-1].reshape(captured[-1].shape[0], -1), labels[start : start + FEATURE_BATCH], outputs
    finally:
        handle.remove()
