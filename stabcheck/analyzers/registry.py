"""The explicit mapping from public analyzer ids to analyzer classes."""

from __future__ import annotations

from stabcheck.analyzers.base import Analyzer
from stabcheck.analyzers.gradient_coherence import GradientCoherenceAnalyzer
from stabcheck.analyzers.hessian_trace import HessianTraceAnalyzer
from stabcheck.analyzers.lmc import LmcAnalyzer
from stabcheck.analyzers.neural_collapse import NeuralCollapseAnalyzer
from stabcheck.analyzers.sharpness import SharpnessAnalyzer
from stabcheck.analyzers.softmax_collapse import SoftmaxCollapseAnalyzer
from stabcheck.errors import UsageError

ANALYZERS: dict[str, type[Analyzer]] = {
    SharpnessAnalyzer.id: SharpnessAnalyzer,
    HessianTraceAnalyzer.id: HessianTraceAnalyzer,
    GradientCoherenceAnalyzer.id: GradientCoherenceAnalyzer,
    LmcAnalyzer.id: LmcAnalyzer,
    SoftmaxCollapseAnalyzer.id: SoftmaxCollapseAnalyzer,
    NeuralCollapseAnalyzer.id: NeuralCollapseAnalyzer,
}

# Analyzer ids reserved by the JSON contract whose implementation has not shipped yet.
PLANNED: tuple[str, ...] = ()


def resolve_analyzers(ids: list[str] | None) -> list[Analyzer]:
    """Instantiate the requested analyzers in the order given, or all of them by default."""
    if not ids:
        return [cls() for cls in ANALYZERS.values()]
    chosen = []
    for analyzer_id in ids:
        if analyzer_id in ANALYZERS:
            if all(a.id != analyzer_id for a in chosen):
                chosen.append(ANALYZERS[analyzer_id]())
        elif analyzer_id in PLANNED:
            raise UsageError(
                f"analyzer {analyzer_id!r} is not available in this version of stabcheck; "
                f"available: {', '.join(ANALYZERS)}."
            )
        else:
            raise UsageError(f"unknown analyzer {analyzer_id!r}; valid ids: {', '.join(ANALYZERS)}.")
    return chosen
