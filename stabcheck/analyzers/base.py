"""The analyzer contract: what an analyzer needs, what it returns, and the context it runs in."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from stabcheck.engine.hvp import HessianOperator, estimate_operator_bytes, saved_bytes_fit
from stabcheck.engine.memory import format_bytes
from stabcheck.engine.objective import Objective
from stabcheck.loading.data import AnalysisSet
from stabcheck.loading.optimizer import TrainingSettings

STATUSES = ("ok", "skipped", "error", "inconclusive")


@dataclass(frozen=True)
class AnalyzerResult:
    """Findings of one analyzer on one checkpoint.

    ``metrics`` use the public metric names; a value that is undefined or not trustworthy is
    None, with a note saying why. ``diagnostics`` hold the evidence behind the metrics (matvec
    counts, residuals, seeds, dtypes).
    """

    status: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    diagnostics: Mapping[str, Any] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} is not one of {STATUSES}")

    @classmethod
    def skipped(cls, reason: str) -> AnalyzerResult:
        return cls(status="skipped", notes=(reason,))


@dataclass(frozen=True)
class EstimatorSettings:
    """Settings shared by the Hessian estimators; every one is recorded in the report."""

    lanczos_max_iter: int = 100
    lanczos_tol: float = 1e-4
    top_k: int = 3
    hvp_method: str = "retained"
    trace_method: str = "hutchinson"
    # None: draw probes until the relative standard error reaches trace_rel_stderr.
    trace_probes: int | None = None
    trace_rel_stderr: float = 0.05
    trace_max_probes: int = 200
    density_probes: int = 3
    density_steps: int = 60
    per_layer: bool = False
    # Per-example gradients: "auto" (layer rule where it applies, vmap elsewhere), "vmap" or "loop".
    per_example_method: str = "auto"
    # Bytes the per-example statistics may allocate; None takes half the free memory at run time.
    memory_budget: int | None = None
    # Examples with the largest gradient norms searched for opposing groups, and the pairs reported.
    opposing_candidates: int = 128
    opposing_groups: int = 3
    # Linear mode connectivity: grid points from A to B, BatchNorm reset, per-module barriers, alignment.
    lmc_points: int = 25
    bn_reset: bool = True
    lmc_layers: bool = True
    align: str = "none"
    # Softmax collapse: the dtype the training loss runs in, which sc_fraction and the gate judge.
    loss_dtype: str = "float32"
    # Neural collapse: the classifier layer whose input is the penultimate feature; None finds it.
    feature_layer: str | None = None

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


ProgressFactory = Callable[[str], Callable[[int, int, float], None] | None]


@dataclass
class AnalysisContext:
    """Everything an analyzer may read for one checkpoint.

    The Hessian operator is built on first use and shared by the analyzers of this checkpoint.
    """

    model: torch.nn.Module
    objective: Objective
    data: AnalysisSet
    training: TrainingSettings
    estimator: EstimatorSettings
    seed: int
    progress: ProgressFactory = lambda label: None
    # Bytes an analyzer may allocate for its own statistics; None takes half the free memory.
    memory_budget: int | None = None
    # The second endpoint for linear mode connectivity (a copy of the model with its weights),
    # and its checkpoint entry for the report.
    partner: torch.nn.Module | None = None
    partner_entry: dict[str, Any] | None = None
    # Why there is no second endpoint, when the caller knows better than the generic reason.
    partner_missing: str | None = None
    _hessian: HessianOperator | None = None
    _operator_bytes: int | None = None
    # saved_bytes_fit results by create_graph, so each probe runs once per checkpoint.
    _saved_fits: dict[bool, tuple[float, float]] = field(default_factory=dict)
    _hvp_method: str | None = None
    # Notes on how the Hessian operator was fitted to the memory budget, for the analyzers' results.
    operator_notes: list[str] = field(default_factory=list)

    def memory_shortfall(self, extra_bytes: int, vectors: str, remedy: str) -> str | None:
        """Return why a Hessian analysis does not fit the memory budget, or None when it fits.

        The estimate is the Hessian operator's gradient graph plus ``extra_bytes`` of the
        analysis's own vectors. ``vectors`` describes them and ``remedy`` names the option that
        lowers them. When the graph of every example does not fit but that of a chunk does, the
        products recompute the graph chunk by chunk instead, with a note.
        """
        if self.memory_budget is None:
            return None
        method = self._hvp_method or self.estimator.hvp_method
        if self._operator_bytes is None:
            self._operator_bytes = estimate_operator_bytes(self.objective, method, self._saved_fit(create_graph=True))
        parts = {f"the gradient graph with --hvp-method {method}": self._operator_bytes, vectors: extra_bytes}
        # Every rank takes the same branches, so each collective below runs on all ranks.
        needed = self.objective.group.max_int(int(sum(parts.values())))
        if needed <= self.memory_budget:
            return None
        chunk = None if self._hessian is not None else self._fitting_chunk(extra_bytes)
        fits = self.objective.group.min_int(0 if chunk is None else 1) == 1
        if not fits:
            message = self._shortfall_message(needed, parts, remedy)
            smallest = self._smallest_chunked_bytes(extra_bytes)
            if smallest is not None:
                message += (
                    f". Recomputing the graph one example at a time, the smallest setting, would need "
                    f"about {format_bytes(self.objective.group.max_int(smallest))}"
                )
            return message
        self.objective.chunk_size = chunk
        self._hvp_method = "recompute"
        self._operator_bytes = estimate_operator_bytes(self.objective, "recompute", self._saved_fit(create_graph=True))
        self.operator_notes.append(
            f"Hessian-vector products recompute the gradient graph in chunks of {chunk} examples, because "
            f"the graph of all {self.objective.num_samples} would not fit the memory budget of "
            f"{format_bytes(self.memory_budget)}; each product costs one more forward and backward"
        )
        return None

    def spare_bytes(self, extra_bytes: int) -> int | None:
        """Return the budget left beside the Hessian operator's graph and ``extra_bytes``.

        ``None`` when no budget is set. Call it after :meth:`memory_shortfall`, which settles how
        the operator is built. Every rank gets the smallest value of all ranks.
        """
        if self.memory_budget is None:
            return None
        method = self._hvp_method or self.estimator.hvp_method
        if self._operator_bytes is None:
            self._operator_bytes = estimate_operator_bytes(self.objective, method, self._saved_fit(create_graph=True))
        needed = self.objective.group.max_int(int(self._operator_bytes + extra_bytes))
        return self.memory_budget - needed

    def _smallest_chunked_bytes(self, extra_bytes: int) -> int | None:
        """Return the estimate for recomputing the graph one example at a time, None where chunks cannot be used."""
        if self.objective.couples_examples or self._hessian is not None:
            return None
        fixed, per_example = self._saved_fit(create_graph=True)
        itemsize = torch.finfo(self.objective.dtype).bits // 8
        return int(extra_bytes + 3 * self.objective.dim * itemsize + 3 * fixed + 3 * max(per_example, 0))

    def _fitting_chunk(self, extra_bytes: int) -> int | None:
        """Return the most examples whose recomputed graph fits the budget beside ``extra_bytes``."""
        if self.objective.couples_examples or self.memory_budget is None:
            return None
        fixed, per_example = self._saved_fit(create_graph=True)
        itemsize = torch.finfo(self.objective.dtype).bits // 8
        available = self.memory_budget - extra_bytes - 3 * self.objective.dim * itemsize - 3 * fixed
        if per_example <= 0:
            return self.objective.num_samples if available > 0 else None
        chunk = int(available // (3 * per_example))
        return min(chunk, self.objective.num_samples) if chunk >= 1 else None

    def _shortfall_message(self, needed: int, parts: Mapping[str, int], remedy: str | None) -> str:
        listed = ", ".join(f"{format_bytes(size)} for {description}" for description, size in parts.items())
        return (
            f"skipped before allocating: it needs about {format_bytes(needed)} (an estimate: {listed}), more "
            f"than the memory budget of {format_bytes(self.memory_budget or 0)}. Raise --memory-budget, "
            + (f"{remedy}, " if remedy else "")
            + "or lower --max-samples"
        )

    def budget_shortfall(self, parts: Mapping[str, int], remedy: str | None) -> str | None:
        """Return why the estimated ``parts`` (description to bytes) exceed the budget, or None."""
        if self.memory_budget is None:
            return None
        # Ranks with different shard sizes must reach the same decision, or collectives would hang.
        needed = self.objective.group.max_int(int(sum(parts.values())))
        if needed <= self.memory_budget:
            return None
        return self._shortfall_message(needed, parts, remedy)

    def _saved_fit(self, *, create_graph: bool) -> tuple[float, float]:
        if create_graph not in self._saved_fits:
            self._saved_fits[create_graph] = saved_bytes_fit(self.objective, create_graph=create_graph)
        return self._saved_fits[create_graph]

    def activation_bytes(self, examples: int, *, with_graph: bool) -> int:
        """Estimate the bytes of a forward pass over ``examples``, with one gradient's graph or without."""
        fixed, per_example = self._saved_fit(create_graph=False)
        # A forward without a graph keeps about one layer's activations alive. Counting all of
        # them, as a graph would, errs on the safe side.
        return int(fixed + per_example * min(examples, self.objective.num_samples)) * (2 if with_graph else 1)

    def hessian(self) -> HessianOperator:
        if self._hessian is None:
            self._hessian = HessianOperator(self.objective, method=self._hvp_method or self.estimator.hvp_method)
        return self._hessian

    def release(self) -> None:
        if self._hessian is not None:
            self._hessian.release()
        self._hessian = None


class Analyzer(ABC):
    """An analysis with a stable public id. Subclasses set the class attributes and ``run``.

    ``run`` returns an AnalyzerResult and never prints or writes files; judging the result
    against thresholds is the job of :mod:`stabcheck.gates`.
    """

    id: ClassVar[str]
    title: ClassVar[str]
    cost: ClassVar[str]
    reference: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]]
    interpretation: ClassVar[dict[str, str]]
    limits: ClassVar[tuple[str, ...]] = ()
    # Metrics whose value is a list or a table; gates take single numbers only.
    structured_metrics: ClassVar[tuple[str, ...]] = ()
    # Scalar metrics where a move in one direction is a regression: "higher" means a rise is worse.
    # A baseline comparison fails only on these; the other metrics are compared for information.
    worse_when: ClassVar[dict[str, str]] = {}

    @classmethod
    def metric_uncertainty(cls, metric: str, result: Mapping[str, Any]) -> float:
        """Return one standard error (or error bound) of ``metric`` in a result dict; 0 for exact values."""
        return 0.0

    def skip_reason(self, context: AnalysisContext) -> str | None:
        """Say why this analyzer cannot run on the context, or None when it can."""
        return None

    @abstractmethod
    def run(self, context: AnalysisContext) -> AnalyzerResult: ...


def finite_or_none(value: float | None) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None
