"""Hessian trace and Frobenius norm against SGD's linear-stability bounds, with the spectral density.

Wu & Su (ICML 2023, "The Implicit Regularization of Dynamical Stability in SGD") show that a
minimum that is linearly stable for SGD with learning rate lr satisfies tr(H) <= 2/lr under their
assumptions on the loss, so ``trace_ratio`` = tr(H) / (2/lr) above 1 means SGD cannot stay at this
point. Wu, Wang & Su (2022, "The alignment property of SGD noise and how it helps select flat
minima") bound the Frobenius norm of stable minima by sqrt(B)/lr for batch size B.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from stabcheck.analyzers.base import AnalysisContext, Analyzer, AnalyzerResult, finite_or_none
from stabcheck.engine.density import spectral_density
from stabcheck.engine.lanczos import basis_bytes
from stabcheck.engine.hvp import module_blocks, restricted_operator
from stabcheck.engine.trace import (
    MIN_SEQUENTIAL_PROBES,
    TraceEstimate,
    deflated_hutchinson,
    hutch_plus_plus,
    hutchinson,
)

DENSITY_GRID_POINTS = 200


class HessianTraceAnalyzer(Analyzer):
    id = "hessian-trace"
    title = "Hessian trace and SGD stability bounds"
    cost = "moderate"
    reference = (
        "Wu & Su 2023, The Implicit Regularization of Dynamical Stability in SGD; Wu, Wang & Su 2022, "
        "The alignment property of SGD noise and how it helps select flat minima; Ghorbani, Krishnan "
        "& Xiao 2019, An Investigation into Neural Network Optimization via Hessian Eigenvalue Density"
    )
    metric_names = (
        "trace",
        "trace_stderr",
        "trace_bound",
        "trace_ratio",
        "frobenius_norm",
        "frobenius_ratio",
        "spectral_density",
    )
    structured_metrics = ("spectral_density",)
    worse_when = {"trace": "higher", "trace_ratio": "higher", "frobenius_norm": "higher", "frobenius_ratio": "higher"}

    @classmethod
    def metric_uncertainty(cls, metric: str, result: Mapping[str, Any]) -> float:
        """Standard errors of the probe estimates; a ratio's is the estimate's scaled by the bound."""
        metrics = result.get("metrics", {})
        source = {"trace": "trace", "trace_ratio": "trace", "frobenius_norm": "frobenius_norm", "frobenius_ratio": "frobenius_norm"}
        base = source.get(metric)
        if base is None:
            return 0.0
        stderr = metrics.get("trace_stderr") if base == "trace" else result.get("diagnostics", {}).get("frobenius_stderr")
        value, estimate = metrics.get(metric), metrics.get(base)
        if stderr is None or value is None or not estimate:
            return 0.0
        return float(stderr) * abs(float(value) / float(estimate))
    interpretation = {
        "trace": "Trace of the Hessian (sum of all eigenvalues), estimated with random probes; it can be negative away from a minimum.",
        "trace_stderr": "Standard error of the trace estimate from the probe samples; the true trace is within about 3 standard errors.",
        "trace_bound": "2/lr: the largest trace of a minimum that SGD with this learning rate can stay at (Wu & Su 2023).",
        "trace_ratio": (
            "Trace over the bound. At a minimum, a ratio above 1 means SGD is linearly unstable there "
            "(under Wu & Su's assumptions) and will move away; minima that SGD converges to sit below 1."
        ),
        "frobenius_norm": "Frobenius norm of the Hessian, from the mean of |Hv|^2 over the same probes.",
        "frobenius_ratio": "Frobenius norm over sqrt(B)/lr, the bound for minima that SGD with batch size B can stay at (Wu, Wang & Su 2022).",
        "spectral_density": "Eigenvalue density from stochastic Lanczos quadrature: where the Hessian's eigenvalues lie, outliers included.",
    }
    limits = (
        "The bounds assume SGD without momentum near a minimum; for other optimizers they are null.",
        "Per-layer traces always use Hutchinson's method with the analyzer's probe settings.",
        "The bounds describe the noise of mini-batch SGD. Full-batch gradient descent is limited by "
        "lambda_max alone, and its trace can sit far above 2/lr.",
        "Hutchinson's standard error is itself estimated from the probes; with few probes it can be off by a large factor.",
        "The spectral density resolves outliers and the bulk, not single eigenvalues inside the bulk.",
    )

    def run(self, context: AnalysisContext) -> AnalyzerResult:
        settings = context.estimator
        objective = context.objective
        itemsize = torch.finfo(objective.dtype).bits // 8
        if settings.trace_method == "hutch++":
            # The sketch and its orthonormal basis, each a third of the products wide.
            probes = settings.trace_probes or settings.trace_max_probes
            vectors = 2 * (probes // 3 + 1) + 3
        else:
            vectors = 4
        extra = max(vectors * objective.dim * itemsize, basis_bytes(objective.dim, settings.density_steps, objective.dtype))
        shortfall = context.memory_shortfall(
            extra, "the probe vectors and the density's Lanczos basis", "lower --density-steps or --trace-probes"
        )
        if shortfall is not None:
            return AnalyzerResult.skipped(shortfall)
        operator = context.hessian()
        notes: list[str] = list(context.operator_notes)
        common = {"seed": context.seed, "dtype": operator.dtype, "device": operator.device}

        if settings.trace_method == "hutch++":
            estimate = hutch_plus_plus(operator.matvec, operator.dim, num_matvecs=settings.trace_probes or settings.trace_max_probes, **common)
        elif settings.trace_method == "deflated":
            estimate = _deflated(context, operator.matvec, operator.dim, notes)
        else:
            estimate = _hutchinson(context, operator.matvec, operator.dim)
        status = "ok"
        if settings.trace_probes is None and not estimate.reached_target:
            status = "inconclusive"
            notes.append(
                f"the trace's relative standard error did not reach {settings.trace_rel_stderr:g} within "
                f"{estimate.num_matvecs} products (estimate {estimate.trace:.6g} +/- {estimate.trace_stderr:.3g}); "
                "raise --trace-max-probes, or fix the count with --trace-probes"
                + ("; --trace-method deflated reaches a tight target with fewer products" if estimate.method == "hutchinson" else "")
            )

        if estimate.num_probes < MIN_SEQUENTIAL_PROBES and estimate.trace_stderr > 0:
            notes.append(
                f"trace_stderr comes from {estimate.num_probes} probes; below {MIN_SEQUENTIAL_PROBES} the "
                "standard error is itself uncertain by 13% or more, so raise --trace-probes for a firm error bar"
            )

        trace_bound, bound_note = _trace_bound(context)
        if bound_note:
            notes.append(bound_note)
        batch_size, batch_source = _batch_size(context)
        frobenius_bound = None
        if trace_bound is not None and batch_size is not None:
            frobenius_bound = math.sqrt(batch_size) / context.training.lr
            notes.append(f"frobenius_ratio uses batch size B={batch_size} from the {batch_source}")
        elif trace_bound is not None and estimate.frobenius_norm is not None:
            notes.append("frobenius_ratio needs the training batch size; pass --batch-size")

        density = spectral_density(
            operator.matvec, operator.dim, num_probes=settings.density_probes, num_steps=settings.density_steps, **common
        )
        metrics = {
            "trace": finite_or_none(estimate.trace),
            "trace_stderr": finite_or_none(estimate.trace_stderr),
            "trace_bound": finite_or_none(trace_bound),
            "trace_ratio": finite_or_none(estimate.trace / trace_bound) if trace_bound else None,
            "frobenius_norm": finite_or_none(estimate.frobenius_norm),
            "frobenius_ratio": (
                finite_or_none(estimate.frobenius_norm / frobenius_bound)
                if frobenius_bound and estimate.frobenius_norm is not None
                else None
            ),
            "spectral_density": _density_json(density),
        }
        diagnostics: dict[str, Any] = {
            "trace_estimator": _estimate_json(estimate),
            "frobenius_stderr": finite_or_none(estimate.frobenius_stderr),
            "batch_size": batch_size,
            "batch_size_source": batch_source,
            "density_probes": density.num_probes,
            "density_matvecs": density.num_matvecs,
            "num_parameters": operator.dim,
        }
        if settings.per_layer:
            diagnostics["per_layer"] = _per_layer_traces(context)
        if estimate.frobenius_norm is None:
            notes.append(f"{estimate.method} gives no Frobenius norm; use --trace-method hutchinson for it")
        return AnalyzerResult(status=status, metrics=metrics, diagnostics=diagnostics, notes=tuple(notes))


def _hutchinson(context: AnalysisContext, matvec: Any, dim: int) -> TraceEstimate:
    """Run Hutchinson with a fixed probe count if one is set, else until the target precision."""
    settings = context.estimator
    operator = context.hessian()
    return hutchinson(
        matvec,
        dim,
        num_probes=settings.trace_probes,
        target_rel_stderr=None if settings.trace_probes else settings.trace_rel_stderr,
        max_probes=settings.trace_max_probes,
        seed=context.seed,
        dtype=operator.dtype,
        device=operator.device,
    )


def _deflated(context: AnalysisContext, matvec: Any, dim: int, notes: list[str]) -> TraceEstimate:
    """Run deflated Hutchinson with its Krylov basis capped by the memory budget."""
    settings = context.estimator
    operator = context.hessian()
    itemsize = torch.finfo(operator.dtype).bits // 8
    budget = settings.trace_probes or settings.trace_max_probes
    requested = budget // 2 if settings.trace_probes else budget
    max_basis = requested
    # The estimator's own probe and product vectors sit beside the basis.
    spare = context.spare_bytes(4 * dim * itemsize)
    if spare is not None and spare // (dim * itemsize) < requested:
        max_basis = max(int(spare // (dim * itemsize)), 0)
    estimate = deflated_hutchinson(
        matvec,
        dim,
        num_probes=settings.trace_probes,
        target_rel_stderr=None if settings.trace_probes else settings.trace_rel_stderr,
        max_probes=settings.trace_max_probes,
        max_basis=max_basis,
        seed=context.seed,
        dtype=operator.dtype,
        device=operator.device,
    )
    if max_basis < requested and estimate.basis_size == max_basis:
        notes.append(
            f"the memory budget capped the deflation basis at {max_basis} vectors of {dim} values, "
            "so the trace estimate drew more probes instead"
        )
    return estimate


def _per_layer_traces(context: AnalysisContext) -> list[dict[str, Any]]:
    """Estimate the trace of each module's diagonal Hessian block with the analyzer's settings."""
    operator = context.hessian()
    rows = []
    for module, names in module_blocks(operator.layout.names).items():
        matvec, dim = restricted_operator(operator.matvec, operator.layout, names)
        estimate = _hutchinson(context, matvec, dim)
        rows.append(
            {
                "block": module,
                "num_parameters": dim,
                "trace": finite_or_none(estimate.trace),
                "trace_stderr": finite_or_none(estimate.trace_stderr),
                "reached_target": estimate.reached_target,
                "matvecs": estimate.num_matvecs,
            }
        )
    return rows


def _trace_bound(context: AnalysisContext) -> tuple[float | None, str | None]:
    training = context.training
    if training.lr is None:
        return None, "no learning rate in the checkpoint or options; pass --lr to get trace_bound and trace_ratio"
    if training.optimizer not in (None, "sgd") or training.momentum:
        return None, (
            f"the bounds 2/lr and sqrt(B)/lr hold for SGD without momentum, and this run used "
            f"{training.optimizer}, so trace_bound, trace_ratio and frobenius_ratio are null"
        )
    return 2.0 / training.lr, None


def _batch_size(context: AnalysisContext) -> tuple[int | None, str | None]:
    if context.training.batch_size is not None:
        source = "options" if "batch_size" in context.training.overridden else "checkpoint"
        return context.training.batch_size, source
    if context.data.loader_batch_size is not None:
        return context.data.loader_batch_size, "data loader"
    return None, None


def _estimate_json(estimate: TraceEstimate) -> dict[str, Any]:
    return {
        "method": estimate.method,
        "num_probes": estimate.num_probes,
        "basis_size": estimate.basis_size,
        "matvecs": estimate.num_matvecs,
        "target_rel_stderr": estimate.target_rel_stderr,
        "reached_target": estimate.reached_target,
        "seed": estimate.seed,
    }


def _density_json(density: Any) -> dict[str, Any]:
    nodes = np.concatenate([np.asarray(n, dtype=float) for n in density.nodes])
    low, high = float(nodes.min()), float(nodes.max())
    spread = max(high - low, 1e-12 * max(abs(low), abs(high), 1.0))
    sigma = spread / 100
    grid = np.linspace(low - 5 * sigma, high + 5 * sigma, DENSITY_GRID_POINTS)
    return {
        "nodes": [[float(v) for v in probe] for probe in density.nodes],
        "weights": [[float(w) for w in probe] for probe in density.weights],
        "grid": [float(v) for v in grid],
        "density": [float(v) for v in density.broadened(grid, sigma)],
        "sigma": sigma,
    }
