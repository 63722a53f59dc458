"""Edge-of-stability sharpness: extreme Hessian eigenvalues against the optimizer's stability threshold.

On a quadratic with curvature lambda, gradient descent with step size lr is stable when
lambda < 2/lr. Cohen et al. (2021, "Gradient Descent on Neural Networks Typically Occurs at the
Edge of Stability") observed that full-batch training raises the top Hessian eigenvalue until it
reaches that threshold and then hovers there. The same quadratic argument gives
(2 + 2 beta) / lr for heavy-ball momentum beta and (2 + 2 beta) / ((1 + 2 beta) lr) for Nesterov
momentum. For Adam it gives (2 + 2 beta1) / ((1 - beta1) lr) on the preconditioned Hessian
P^-1/2 H P^-1/2 (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability").
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from stabcheck.analyzers.base import AnalysisContext, Analyzer, AnalyzerResult, finite_or_none
from stabcheck.engine.hvp import module_blocks, restricted_operator, scaled_operator
from stabcheck.engine.lanczos import LanczosResult, basis_bytes, lanczos
from stabcheck.loading.optimizer import TrainingSettings

NUM_REPORTED_RITZ = 10


@dataclass(frozen=True)
class Threshold:
    """The largest stable curvature for the optimizer, and which Hessian it applies to."""

    value: float | None
    rule: str
    preconditioned: bool
    note: str | None = None


def stability_threshold(training: TrainingSettings) -> Threshold:
    """Compute the linear-stability threshold on curvature for the training settings."""
    kind, lr = training.optimizer, training.lr
    if lr is None:
        return Threshold(None, "unknown", False, "no learning rate in the checkpoint or options; pass --lr to get threshold and edge_ratio")
    if kind in (None, "sgd") and not training.momentum:
        return Threshold(2.0 / lr, "2/lr for gradient descent", False)
    if kind in ("sgd", "momentum", None):
        beta = float(training.momentum or 0.0)
        if training.nesterov:
            return Threshold((2 + 2 * beta) / ((1 + 2 * beta) * lr), "(2+2*beta)/((1+2*beta)*lr) for Nesterov momentum", False)
        effective_lr = lr * (1.0 - training.dampening)
        if effective_lr <= 0:
            return Threshold(None, "unknown", False, f"dampening {training.dampening} leaves no effective step; threshold undefined")
        rule = "(2+2*beta)/lr for heavy-ball momentum" if not training.dampening else "(2+2*beta)/((1-dampening)*lr) for heavy-ball momentum"
        return Threshold((2 + 2 * beta) / effective_lr, rule, False)
    if kind in ("adam", "adamw"):
        beta1 = training.betas[0] if training.betas else 0.9
        return Threshold((2 + 2 * beta1) / ((1 - beta1) * lr), "(2+2*beta1)/((1-beta1)*lr) on P^-1/2 H P^-1/2 for Adam", True)
    return Threshold(None, "unknown", False, f"no stability threshold is defined for optimizer {kind!r}")


def adam_preconditioner_scale(training: TrainingSettings, names: tuple[str, ...]) -> torch.Tensor:
    """Return the flat diagonal of P^-1/2 for Adam at the checkpoint.

    Adam's step is lr * m_hat / (sqrt(v_hat) + eps) with m_hat = m / (1 - beta1^t) and
    v_hat = v / (1 - beta2^t). Written as lr * P^-1 m with the raw first moment m,
    P = (1 - beta1^t) * diag(sqrt(v_hat) + eps).
    """
    if training.exp_avg_sq is None or not training.optimizer_step or training.betas is None:
        raise ValueError("Adam's preconditioner needs exp_avg_sq, a positive step count and betas")
    beta1, beta2 = training.betas
    step = training.optimizer_step
    eps = training.eps if training.eps is not None else 1e-8
    v = torch.cat([training.exp_avg_sq[name].detach().to(torch.float64).reshape(-1) for name in names])
    diagonal = (1 - beta1**step) * (torch.sqrt(v / (1 - beta2**step)) + eps)
    return diagonal.rsqrt()


class SharpnessAnalyzer(Analyzer):
    id = "sharpness"
    title = "Edge-of-stability sharpness"
    cost = "moderate"
    reference = (
        "Cohen et al. 2021, Gradient Descent on Neural Networks Typically Occurs at the Edge of "
        "Stability; Cohen et al. 2022, Adaptive Gradient Methods at the Edge of Stability"
    )
    metric_names = (
        "lambda_max",
        "lambda_min",
        "top_eigenvalues",
        "threshold",
        "edge_ratio",
        "preconditioned_lambda_max",
    )
    structured_metrics = ("top_eigenvalues",)
    worse_when = {"lambda_max": "higher", "edge_ratio": "higher", "preconditioned_lambda_max": "higher"}

    @classmethod
    def metric_uncertainty(cls, metric: str, result: Mapping[str, Any]) -> float:
        # Some eigenvalue lies within the residual of the top Ritz value, so the residual bounds
        # lambda_max's error. The preconditioned run's residual is not kept, so its value counts as exact.
        metrics = result.get("metrics", {})
        residuals = result.get("diagnostics", {}).get("lanczos", {}).get("top_residuals") or []
        if not residuals or metrics.get("preconditioned_lambda_max") is not None:
            return 0.0
        if metric == "lambda_max":
            return float(residuals[0])
        if metric == "edge_ratio" and metrics.get("threshold"):
            return float(residuals[0]) / float(metrics["threshold"])
        return 0.0
    interpretation = {
        "lambda_max": "Largest Hessian eigenvalue (sharpness) of the training objective at this checkpoint.",
        "lambda_min": "Smallest Hessian eigenvalue; clearly negative values mean the point is not a minimum.",
        "top_eigenvalues": "Largest Hessian eigenvalues, descending; a large gap after the first few is typical of classifiers (about one outlier per class).",
        "threshold": (
            "Largest curvature the optimizer can follow stably on a quadratic: 2/lr for gradient descent, "
            "(2+2*beta)/lr with momentum, (2+2*beta1)/((1-beta1)*lr) for Adam's preconditioned Hessian."
        ),
        "edge_ratio": (
            "Sharpness (for Adam, preconditioned_lambda_max) over the threshold. Full-batch training typically rises to about 1 and hovers "
            "there (the edge of stability, Cohen et al. 2021); well above 1 means the optimizer cannot "
            "be stable at this point, so expect loss spikes or divergence unless the run is mini-batch."
        ),
        "preconditioned_lambda_max": "For Adam: largest eigenvalue of P^-1/2 H P^-1/2, the curvature Adam's preconditioned step sees.",
    }

    limits = (
        "Single-vector Lanczos finds each distinct eigenvalue once: an eigenvalue of multiplicity k "
        "appears once in top_eigenvalues.",
        "The thresholds come from a quadratic model of the loss and full-batch steps; mini-batch "
        "SGD noise lets runs stay well below them.",
        "An eigenvalue whose Lanczos residual is above tolerance is reported as null, with the Ritz "
        "value in the notes as a bound.",
    )

    def run(self, context: AnalysisContext) -> AnalyzerResult:
        settings = context.estimator
        shortfall = context.memory_shortfall(
            basis_bytes(context.objective.dim, settings.lanczos_max_iter, context.objective.dtype),
            f"the Lanczos basis of {settings.lanczos_max_iter} steps",
            "lower --lanczos-iters",
        )
        if shortfall is not None:
            return AnalyzerResult.skipped(shortfall)
        operator = context.hessian()
        threshold = stability_threshold(context.training)
        notes: list[str] = list(context.operator_notes)
        if threshold.note:
            notes.append(threshold.note)

        plain = _run_lanczos(context, operator.matvec, num_top=settings.top_k, num_bottom=1, label="sharpness: Lanczos")
        top_ok = plain.top_converged
        lambda_max = float(plain.top[0]) if top_ok[0] else None
        lambda_min = float(plain.bottom[0]) if plain.bottom_converged[0] else None
        top_values = [float(v) if ok else None for v, ok in zip(plain.top, top_ok)]
        if lambda_max is None:
            notes.append(_unconverged_note("lambda_max", plain, 0, top=True))
        if lambda_min is None:
            notes.append(_unconverged_note("lambda_min", plain, 0, top=False))
        for index in range(1, len(top_values)):
            if top_values[index] is None:
                notes.append(_unconverged_note(f"top_eigenvalues[{index}]", plain, index, top=True))
        if plain.invariant_subspace:
            notes.append("Lanczos found an invariant subspace; the Ritz values are exact eigenvalues of the Hessian restricted to it")

        diagnostics: dict[str, Any] = {
            "lanczos": _lanczos_diagnostics(plain),
            "hvp_method": operator.method,
            "dtype": str(operator.dtype).replace("torch.", ""),
            "num_parameters": operator.dim,
            "loss": operator.loss,
            "gradient_norm": float(torch.linalg.vector_norm(operator.gradient)),
            "threshold_rule": threshold.rule,
            "unused_parameters": list(operator.unused_parameters),
        }
        if operator.unused_parameters:
            notes.append(
                "parameters never used by the forward pass (zero gradient and Hessian rows): "
                + ", ".join(operator.unused_parameters)
            )

        preconditioned = None
        compared = lambda_max
        compared_converged = bool(top_ok[0])
        if threshold.preconditioned:
            preconditioned = _preconditioned_sharpness(context, notes, diagnostics)
            compared = preconditioned
            # Before Adam's first step the compared value is undefined by definition, not unconverged.
            compared_converged = preconditioned is not None or "undefined" in diagnostics
        else:
            notes.append("preconditioned_lambda_max applies to Adam and AdamW only")

        if settings.per_layer:
            diagnostics["per_layer"] = _per_layer_sharpness(context)

        edge_ratio = None
        if compared is not None and threshold.value:
            edge_ratio = compared / threshold.value

        status = "ok"
        if not compared_converged:
            status = "inconclusive"

        metrics = {
            "lambda_max": finite_or_none(lambda_max),
            "lambda_min": finite_or_none(lambda_min),
            "top_eigenvalues": [finite_or_none(v) for v in top_values],
            "threshold": finite_or_none(threshold.value),
            "edge_ratio": finite_or_none(edge_ratio),
            "preconditioned_lambda_max": finite_or_none(preconditioned),
        }
        return AnalyzerResult(status=status, metrics=metrics, diagnostics=diagnostics, notes=tuple(notes))


def _run_lanczos(
    context: AnalysisContext,
    matvec: Callable[[torch.Tensor], torch.Tensor],
    *,
    num_top: int,
    num_bottom: int,
    label: str | None = None,
    dim: int | None = None,
) -> LanczosResult:
    """Run Lanczos with the context's settings; ``dim`` defaults to the full parameter count."""
    operator = context.hessian()
    settings = context.estimator
    return lanczos(
        matvec,
        operator.dim if dim is None else dim,
        num_top=num_top,
        num_bottom=num_bottom,
        max_iter=settings.lanczos_max_iter,
        tol=settings.lanczos_tol,
        seed=context.seed,
        dtype=operator.dtype,
        device=operator.device,
        progress=context.progress(label) if label else None,
    )


def _per_layer_sharpness(context: AnalysisContext) -> list[dict[str, Any]]:
    """Return the top eigenvalue of each module's diagonal Hessian block, with its residual."""
    operator = context.hessian()
    rows = []
    for module, names in module_blocks(operator.layout.names).items():
        matvec, dim = restricted_operator(operator.matvec, operator.layout, names)
        result = _run_lanczos(context, matvec, num_top=1, num_bottom=0, dim=dim)
        converged = bool(result.top_converged[0])
        rows.append(
            {
                "block": module,
                "parameters": names,
                "num_parameters": dim,
                "lambda_max": float(result.top[0]) if converged else None,
                "residual": float(result.top_residuals[0]),
                "matvecs": result.num_matvecs,
            }
        )
    return rows


def _preconditioned_sharpness(context: AnalysisContext, notes: list[str], diagnostics: dict[str, Any]) -> float | None:
    """Return the top eigenvalue of P^-1/2 H P^-1/2 for Adam, or None with a note saying why not."""
    training = context.training
    if training.optimizer_step == 0 and training.betas:
        notes.append(
            "Adam has taken no step yet, so it has no preconditioner: preconditioned_lambda_max and "
            "edge_ratio are undefined at this checkpoint, and gates on them skip it"
        )
        diagnostics["undefined"] = ["preconditioned_lambda_max", "edge_ratio"]
        return None
    if training.exp_avg_sq is None or not training.optimizer_step or not training.betas:
        notes.append(
            "Adam's threshold applies to the preconditioned Hessian, which needs exp_avg_sq and "
            "the step count from the checkpoint's optimizer state; edge_ratio is undefined without them"
        )
        return None
    operator = context.hessian()
    scale = adam_preconditioner_scale(training, operator.layout.names).to(dtype=operator.dtype, device=operator.device)
    result = _run_lanczos(
        context, scaled_operator(operator.matvec, scale), num_top=1, num_bottom=0, label="sharpness: preconditioned Lanczos"
    )
    diagnostics["preconditioned_lanczos"] = _lanczos_diagnostics(result)
    diagnostics["adam_step"] = training.optimizer_step
    if not result.top_converged[0]:
        notes.append(_unconverged_note("preconditioned_lambda_max", result, 0, top=True))
        return None
    return float(result.top[0])


def _lanczos_diagnostics(result: LanczosResult) -> dict[str, Any]:
    count = min(NUM_REPORTED_RITZ, len(result.ritz_values))
    return {
        "converged": result.converged,
        "iterations": result.iterations,
        "matvecs": result.num_matvecs,
        "tol": result.tol,
        "seed": result.seed,
        "invariant_subspace": result.invariant_subspace,
        "top_ritz_values": [float(v) for v in result.top],
        "top_residuals": [float(r) for r in result.top_residuals],
        "bottom_ritz_values": [float(v) for v in result.bottom],
        "bottom_residuals": [float(r) for r in result.bottom_residuals],
        "ritz_values": [float(v) for v in result.ritz_values[:count]],
        "ritz_residual_estimates": [float(r) for r in result.residuals[:count]],
        "smallest_ritz_values": [float(v) for v in result.ritz_values[::-1][:count]],
    }


def _unconverged_note(name: str, result: LanczosResult, index: int, *, top: bool) -> str:
    values = result.top if top else result.bottom
    residuals = result.top_residuals if top else result.bottom_residuals
    bound = "a lower" if top else "an upper"
    return (
        f"{name} did not converge in {result.iterations} Lanczos steps: Ritz value {values[index]:.6g} "
        f"has residual {residuals[index]:.3g} > tol {result.tol:g} x scale {result.scale:.3g}. The Ritz "
        f"value is {bound} bound, not an estimate; raise --lanczos-iters to converge it"
    )

