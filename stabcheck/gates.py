"""Gates: thresholds on metrics that turn results into pass / warn / fail / inconclusive findings.

A gate is named ``analyzer-id.metric`` and fires when the value exceeds its ``warn`` or ``fail``
bound. The defaults below apply to the analyzers that ran; a user's table replaces them metric by
metric.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.errors import UsageError

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3


@dataclass(frozen=True)
class Gate:
    name: str
    warn: float | None
    fail: float | None

    @property
    def analyzer_id(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def metric(self) -> str:
        return self.name.split(".", 1)[1]


# Each default comes with the reason for its number; see docs in the README's gate section.
DEFAULT_GATES: dict[str, Gate] = {
    # Full-batch gradient descent settles at sharpness close to 2/lr (edge_ratio about 1): warn
    # from 0.9 so users see that the run is at the edge. Above 1.2 a quadratic model predicts that
    # each step overshoots by 20% along the top direction, which full-batch runs survive only briefly.
    "sharpness.edge_ratio": Gate("sharpness.edge_ratio", warn=0.9, fail=1.2),
    # A collapsed sample has exactly zero loss and gradient, so it no longer trains. Warn once 1%
    # of the analyzed samples have stopped learning, and fail at 5%, when one sample in twenty
    # has dropped out of training.
    "softmax-collapse.sc_fraction": Gate("softmax-collapse.sc_fraction", warn=0.01, fail=0.05),
}


@dataclass(frozen=True)
class GateResult:
    name: str
    checkpoint: int
    value: float | None
    warn: float | None
    fail: float | None
    status: str
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "value": self.value,
            "warn": self.warn,
            "fail": self.fail,
            "status": self.status,
            "reason": self.reason,
        }


def parse_gates(table: Mapping[str, Any] | None) -> dict[str, Gate]:
    """Merge a user's gate table (``{"analyzer.metric": {"warn": x, "fail": y}}``) over the defaults."""
    gates = dict(DEFAULT_GATES)
    for name, bounds in (table or {}).items():
        validate_gate_name(name)
        if not isinstance(bounds, Mapping):
            raise UsageError(f"gate {name!r} must be a table such as {{ warn = 0.9, fail = 1.2 }}, got {bounds!r}.")
        unknown = set(bounds) - {"warn", "fail"}
        if unknown:
            raise UsageError(f"gate {name!r} has unknown keys {sorted(unknown)}; use 'warn' and 'fail'.")
        values = {}
        for key in ("warn", "fail"):
            value = bounds.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise UsageError(f"gate {name!r}: {key} must be a finite number, got {value!r}.")
            values[key] = None if value is None else float(value)
        if values["warn"] is None and values["fail"] is None:
            raise UsageError(f"gate {name!r} sets neither 'warn' nor 'fail'.")
        if values["warn"] is not None and values["fail"] is not None and values["warn"] > values["fail"]:
            raise UsageError(
                f"gate {name!r}: warn {values['warn']} is above fail {values['fail']}, so the warning could "
                "never show. Gates fire above their bounds; set warn <= fail."
            )
        gates[name] = Gate(name, values["warn"], values["fail"])
    return gates


def validate_gate_name(name: str) -> None:
    analyzer_id, dot, metric = name.partition(".")
    if not dot or analyzer_id not in ANALYZERS:
        raise UsageError(
            f"gate {name!r} does not name an analyzer; use 'analyzer-id.metric' with one of: "
            f"{', '.join(ANALYZERS)}."
        )
    analyzer = ANALYZERS[analyzer_id]
    gateable = [m for m in analyzer.metric_names if m not in analyzer.structured_metrics]
    if metric in analyzer.structured_metrics:
        raise UsageError(
            f"gate {name!r}: {metric} is a list, and gates compare single numbers; gate one of: {', '.join(gateable)}."
        )
    if metric not in analyzer.metric_names:
        raise UsageError(f"gate {name!r}: {analyzer_id} has no metric {metric!r}; valid metrics: {', '.join(gateable)}.")


def evaluate_gates(
    gates: Mapping[str, Gate], results: list[Mapping[str, Any]], *, user_gate_names: frozenset[str] = frozenset()
) -> list[GateResult]:
    """Judge each checkpoint's results. ``results[i]`` maps analyzer ids to AnalyzerResult-like dicts.

    A default gate on an analyzer that did not run is left out. A gate that the user set on such
    an analyzer is inconclusive, so a misconfigured run cannot pass silently.
    """
    findings = []
    for index, analyzers in enumerate(results):
        for gate in gates.values():
            result = analyzers.get(gate.analyzer_id)
            if result is None or result["status"] == "skipped":
                if gate.name in user_gate_names:
                    reason = "analyzer did not run" if result is None else f"analyzer skipped: {'; '.join(result['notes'])}"
                    findings.append(GateResult(gate.name, index, None, gate.warn, gate.fail, "inconclusive", reason))
                continue
            findings.append(_judge(gate, index, result))
    return findings


def _judge(gate: Gate, index: int, result: Mapping[str, Any]) -> GateResult:
    value = result["metrics"].get(gate.metric)
    if result["status"] in ("error", "inconclusive"):
        reason = f"{gate.analyzer_id} is {result['status']}: {'; '.join(result['notes'][:2])}"
        return GateResult(gate.name, index, value, gate.warn, gate.fail, "inconclusive", reason)
    if value is None:
        # The note that names the metric explains it; a substring test on "lr" matched unrelated words.
        explanation = next(
            (note for note in result["notes"] if gate.metric in note),
            result["notes"][0] if result["notes"] else "value is undefined",
        )
        return GateResult(gate.name, index, None, gate.warn, gate.fail, "inconclusive", f"{gate.metric} is null: {explanation}")
    if gate.fail is not None and value > gate.fail:
        status = "fail"
    elif gate.warn is not None and value > gate.warn:
        status = "warn"
    else:
        status = "pass"
    return GateResult(gate.name, index, value, gate.warn, gate.fail, status)


def exit_code_for(findings: list[GateResult]) -> int:
    """1 when any gate failed, else 3 when any was inconclusive, else 0 (warnings allowed)."""
    statuses = {finding.status for finding in findings}
    if "fail" in statuses:
        return EXIT_FAIL
    if "inconclusive" in statuses:
        return EXIT_INCONCLUSIVE
    return EXIT_OK
