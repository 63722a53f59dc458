"""Gates: thresholds on metrics that turn results into pass / warn / fail / inconclusive findings.

A gate is named ``analyzer-id.metric`` and fires when the value passes its ``warn`` or ``fail``
bound: above it by default, below it for a gate with ``direction = "below"``. The defaults below
apply to the analyzers that ran; a user's table replaces them metric by metric.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.errors import UsageError

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3


DIRECTIONS = ("above", "below")


@dataclass(frozen=True)
class Gate:
    """A threshold on one metric. The gate fires when the value goes ``above`` its bounds (the
    default ``direction``) or, for a metric that must stay high, ``below`` them."""

    name: str
    warn: float | None
    fail: float | None
    direction: str = "above"
    # A gate on a metric that some tasks leave undefined by design (an accuracy without class
    # labels) is left out where the value is null, instead of making the run inconclusive.
    skip_undefined: bool = False

    @property
    def analyzer_id(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def metric(self) -> str:
        return self.name.split(".", 1)[1]

    def crosses(self, value: float, bound: float | None) -> bool:
        if bound is None:
            return False
        return value > bound if self.direction == "above" else value < bound


# Each default comes with the reason for its number; docs/gates.md explains them for users.
DEFAULT_GATES: dict[str, Gate] = {
    # Full-batch gradient descent settles at sharpness close to 2/lr (edge_ratio about 1): warn
    # from 0.9 so users see that the run is at the edge. Above 1.2 a quadratic model predicts that
    # each step overshoots by 20% along the top direction, which full-batch runs survive only briefly.
    "sharpness.edge_ratio": Gate("sharpness.edge_ratio", warn=0.9, fail=1.2),
    # A collapsed sample has exactly zero loss and gradient, so it no longer trains. Warn once 1%
    # of the analyzed samples have stopped learning, and fail at 5%, when one sample in twenty
    # has dropped out of training.
    "softmax-collapse.sc_fraction": Gate("softmax-collapse.sc_fraction", warn=0.01, fail=0.05),
    # Frankle et al. (2020) call two networks linearly connected when the error on the segment
    # between them rises by less than 2 points. A larger barrier is a finding about the pair, not a
    # broken run, so it only warns.
    "lmc.accuracy_barrier": Gate("lmc.accuracy_barrier", warn=0.02, fail=None, skip_undefined=True),
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
    direction: str = "above"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "checkpoint": self.checkpoint,
            "value": self.value,
            "warn": self.warn,
            "fail": self.fail,
            "direction": self.direction,
            "status": self.status,
            "reason": self.reason,
        }


def parse_gates(table: Mapping[str, Any] | None) -> dict[str, Gate]:
    """Merge a user's gate table over the defaults, metric by metric.

    Each entry is ``{"warn": x, "fail": y}`` with an optional ``"direction": "below"`` for metrics
    that must stay high, or ``False`` to switch a default gate off.
    """
    gates = dict(DEFAULT_GATES)
    for name, bounds in (table or {}).items():
        validate_gate_name(name)
        if bounds is False:
            gates.pop(name, None)
            continue
        gates[name] = _parse_bounds(name, bounds)
    return gates


def _parse_bounds(name: str, bounds: Any) -> Gate:
    if not isinstance(bounds, Mapping):
        raise UsageError(
            f"gate {name!r} must be a table such as {{ warn = 0.9, fail = 1.2 }}, or false to switch it off; got {bounds!r}."
        )
    unknown = set(bounds) - {"warn", "fail", "direction"}
    if unknown:
        raise UsageError(f"gate {name!r} has unknown keys {sorted(unknown)}; use 'warn', 'fail' and 'direction'.")
    direction = bounds.get("direction", "above")
    if direction not in DIRECTIONS:
        raise UsageError(
            f"gate {name!r}: direction {direction!r} is unknown; use 'above' (fires when the value rises "
            "past a bound, the default) or 'below' (fires when it falls under one)."
        )
    values = {}
    for key in ("warn", "fail"):
        value = bounds.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise UsageError(f"gate {name!r}: {key} must be a finite number, got {value!r}.")
        values[key] = None if value is None else float(value)
    warn, fail = values["warn"], values["fail"]
    if warn is None and fail is None:
        raise UsageError(f"gate {name!r} sets neither 'warn' nor 'fail'; set one, or false to switch the gate off.")
    if warn is not None and fail is not None:
        if direction == "above" and warn > fail:
            raise UsageError(
                f"gate {name!r}: warn {warn:g} is above fail {fail:g}, so the warning could never show. "
                "This gate fires above its bounds; set warn <= fail."
            )
        if direction == "below" and warn < fail:
            raise UsageError(
                f"gate {name!r}: warn {warn:g} is below fail {fail:g}, so the warning could never show. "
                "This gate fires below its bounds; set warn >= fail."
            )
    return Gate(name, warn, fail, direction)


_GATE_OPTION = re.compile(r"^\s*([A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+)\s*(<=|>=|=)\s*(\S+)\s*$")


def gates_from_options(fail_options: Sequence[str], warn_options: Sequence[str]) -> dict[str, Any]:
    """Turn ``--gate 'name<=x'`` and ``--gate-warn 'name<=x'`` options into a gate table.

    ``name<=x`` means the value must stay at or below x (the gate fires above it), ``name>=x``
    that it must stay at or above x. ``name=off`` switches a gate off. The options for one metric
    together replace that metric's gate from the config file or the defaults.
    """
    table: dict[str, Any] = {}
    for level, options in (("fail", fail_options), ("warn", warn_options)):
        flag = "--gate" if level == "fail" else "--gate-warn"
        for text in options:
            match = _GATE_OPTION.match(text)
            if match is None:
                raise UsageError(
                    f"{flag} {text!r} is not a gate; write 'analyzer-id.metric<=NUMBER' (fires above), "
                    "'analyzer-id.metric>=NUMBER' (fires below) or 'analyzer-id.metric=off'."
                )
            name, operator, raw = match.groups()
            validate_gate_name(name)
            if operator == "=":
                if raw.lower() != "off":
                    raise UsageError(f"{flag} {text!r}: after '=' only 'off' is allowed; use <= or >= for a bound.")
                table[name] = False
                continue
            try:
                bound = float(raw)
            except ValueError:
                raise UsageError(f"{flag} {text!r}: {raw!r} is not a number.") from None
            if not math.isfinite(bound):
                raise UsageError(f"{flag} {text!r}: the bound must be a finite number.")
            direction = "above" if operator == "<=" else "below"
            entry = table.get(name)
            if entry is False:
                raise UsageError(f"gate {name!r} is both switched off and given a bound on the command line; pick one.")
            entry = dict(entry or {"direction": direction})
            if entry["direction"] != direction:
                raise UsageError(
                    f"gate {name!r} is given with both <= and >= on the command line; a gate has one direction."
                )
            entry[level] = bound
            table[name] = entry
    for name, entry in table.items():
        if entry is not False:
            _parse_bounds(name, entry)
    return table


def merge_gate_tables(file_table: Mapping[str, Any] | None, option_table: Mapping[str, Any]) -> dict[str, Any] | None:
    """Command-line gates replace the config file's gate for the same metric; others stay."""
    if not file_table and not option_table:
        return None
    merged = dict(file_table or {})
    merged.update(option_table)
    return merged


def validate_gate_name(name: str, *, role: str = "gate") -> None:
    """Check that ``name`` is 'analyzer-id.metric' of a single-number metric; ``role`` names it in errors."""
    analyzer_id, dot, metric = name.partition(".")
    if not dot or analyzer_id not in ANALYZERS:
        raise UsageError(
            f"{role} {name!r} does not name an analyzer; use 'analyzer-id.metric' with one of: "
            f"{', '.join(ANALYZERS)}."
        )
    analyzer = ANALYZERS[analyzer_id]
    gateable = gateable_metrics(analyzer_id)
    if metric in analyzer.structured_metrics:
        raise UsageError(
            f"{role} {name!r}: {metric} is a list, and only single numbers are compared; use one of: {', '.join(gateable)}."
        )
    if metric not in analyzer.metric_names:
        raise UsageError(f"{role} {name!r}: {analyzer_id} has no metric {metric!r}; valid metrics: {', '.join(gateable)}.")


def gateable_metrics(analyzer_id: str) -> list[str]:
    analyzer = ANALYZERS[analyzer_id]
    return [m for m in analyzer.metric_names if m not in analyzer.structured_metrics]


def evaluate_gates(
    gates: Mapping[str, Gate],
    results: list[Mapping[str, Any]],
    *,
    user_gate_names: frozenset[str] = frozenset(),
    strict: bool = False,
) -> list[GateResult]:
    """Judge each checkpoint's results. ``results[i]`` maps analyzer ids to AnalyzerResult-like dicts.

    A default gate on an analyzer that did not run is left out. A gate that the user set on such
    an analyzer is inconclusive, so a misconfigured run cannot pass silently. With ``strict``, a
    warning counts as a failure.
    """
    findings = []
    for index, analyzers in enumerate(results):
        for gate in gates.values():
            result = analyzers.get(gate.analyzer_id)
            if result is None or result["status"] == "skipped":
                if gate.name in user_gate_names:
                    reason = "analyzer did not run" if result is None else f"analyzer skipped: {'; '.join(result['notes'])}"
                    findings.append(
                        GateResult(gate.name, index, None, gate.warn, gate.fail, "inconclusive", reason, gate.direction)
                    )
                continue
            if result["status"] == "ok" and result["metrics"].get(gate.metric) is None:
                # An analyzer lists the metrics it cannot define at this checkpoint, such as Adam's
                # edge_ratio before the first step. Some default gates also skip a metric that a
                # task never defines.
                if gate.skip_undefined or gate.metric in result["diagnostics"].get("undefined", ()):
                    continue
            finding = _judge(gate, index, result)
            if strict and finding.status == "warn":
                finding = replace(finding, status="fail", reason="past the warn bound; --strict counts warnings as failures")
            findings.append(finding)
    return findings


def _judge(gate: Gate, index: int, result: Mapping[str, Any]) -> GateResult:
    value = result["metrics"].get(gate.metric)
    if result["status"] in ("error", "inconclusive"):
        reason = f"{gate.analyzer_id} is {result['status']}: {'; '.join(result['notes'][:2])}"
        return GateResult(gate.name, index, value, gate.warn, gate.fail, "inconclusive", reason, gate.direction)
    if value is None:
        # The note that names the metric explains it; a substring test on "lr" matched unrelated words.
        explanation = next(
            (note for note in result["notes"] if gate.metric in note),
            result["notes"][0] if result["notes"] else "value is undefined",
        )
        return GateResult(
            gate.name, index, None, gate.warn, gate.fail, "inconclusive", f"{gate.metric} is null: {explanation}", gate.direction
        )
    if gate.crosses(value, gate.fail):
        status = "fail"
    elif gate.crosses(value, gate.warn):
        status = "warn"
    else:
        status = "pass"
    return GateResult(gate.name, index, value, gate.warn, gate.fail, status, None, gate.direction)


def exit_code_for(findings: list[GateResult]) -> int:
    """1 when any gate failed, else 3 when any was inconclusive, else 0 (warnings allowed)."""
    statuses = {finding.status for finding in findings}
    if "fail" in statuses:
        return EXIT_FAIL
    if "inconclusive" in statuses:
        return EXIT_INCONCLUSIVE
    return EXIT_OK
