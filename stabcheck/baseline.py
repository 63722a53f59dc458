"""Regression checks against a previous report: is this run worse than the baseline?

Every scalar metric of each analyzer is compared with the same metric of the matching checkpoint
in the baseline report. Some metrics have a worse direction (``Analyzer.worse_when``). Such a
metric fails when it moved that way by more than its relative tolerance and by more than twice the
combined uncertainty of the two estimates, so a change within that probe noise does not fail. The
other metrics are listed with their change for information.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.errors import UsageError
from stabcheck.gates import gateable_metrics, validate_gate_name

DEFAULT_TOLERANCE = 0.10
# A change counts only when it exceeds this many combined standard errors.
NOISE_MULTIPLE = 2.0
COMPARED_CONTEXT = (
    ("model", "spec"),
    ("model", "num_parameters"),
    ("data", "spec"),
    ("data", "num_samples"),
    ("run", "dtype"),
)


@dataclass(frozen=True)
class Baseline:
    """A previous report read from disk, with the tolerances it is judged by."""

    path: str
    sha256: str
    document: Mapping[str, Any]
    tolerance: float = DEFAULT_TOLERANCE
    tolerances: Mapping[str, float] = field(default_factory=dict)

    def tolerance_for(self, name: str) -> float:
        return self.tolerances.get(name, self.tolerance)


def load_baseline(
    path: str | Path,
    *,
    tolerance: float | None = None,
    tolerances: Mapping[str, Any] | None = None,
    tolerances_source: str | None = None,
) -> Baseline:
    """Read a stabcheck JSON report (schema 1) to compare against; bad input is a UsageError (exit 2).

    ``tolerances_source`` names where the per-metric tolerances come from (a config file), for errors.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"--baseline {path}: file not found. Pass the JSON report (--json) of an earlier run.") from None
    except OSError as error:
        raise UsageError(f"--baseline {path} cannot be read: {error}.") from None
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(
            f"--baseline {path} is not JSON ({error}). Pass the file written by --json, not the HTML or JUnit report."
        ) from None
    if not isinstance(document, dict) or "schema_version" not in document or not isinstance(document.get("results"), list):
        raise UsageError(f"--baseline {path} is not a stabcheck JSON report (no schema_version and results).")
    if document["schema_version"] != 1:
        raise UsageError(
            f"--baseline {path} has schema_version {document['schema_version']!r}; this stabcheck reads schema 1. "
            "Write a new baseline with this version's --json."
        )
    return Baseline(
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        document=document,
        tolerance=_check_tolerance(DEFAULT_TOLERANCE if tolerance is None else tolerance, "--baseline-tolerance"),
        tolerances=_parse_tolerances(tolerances or {}, tolerances_source),
    )


def _check_tolerance(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise UsageError(f"{where} must be a relative change of 0 or more (0.1 means 10%), got {value!r}.")
    return float(value)


def _parse_tolerances(table: Mapping[str, Any], source: str | None) -> dict[str, float]:
    parsed = {}
    try:
        for name, value in table.items():
            validate_gate_name(name, role="baseline tolerance")
            parsed[name] = _check_tolerance(value, f"baseline tolerance for {name!r}")
    except UsageError as error:
        if source is None:
            raise
        raise UsageError(f"{source}: {error}") from None
    return parsed


def compare_with_baseline(
    checkpoints: list[Mapping[str, Any]], results: list[Mapping[str, Any]], context: Mapping[str, Any], baseline: Baseline
) -> dict[str, Any]:
    """Compare each checkpoint's scalar metrics with its match in the baseline report.

    ``context`` contains the current run's ``model``, ``data`` and ``run`` sections. They are checked
    against the baseline's, and a difference is stated in the notes.
    """
    old = baseline.document
    pairs, notes = match_checkpoints(checkpoints, old.get("checkpoints") or [], baseline.path)
    for section, key in COMPARED_CONTEXT:
        now, before = (context.get(section) or {}).get(key), (old.get(section) or {}).get(key)
        if key == "spec":
            # The same spec file given by another path (relative, absolute) is the same spec.
            now, before = _spec_name(now), _spec_name(before)
        if now != before:
            notes.append(f"{section} {key} differs from the baseline ({before!r} there, {now!r} here), so changes may not be regressions")
    old_results = {entry.get("checkpoint"): entry.get("analyzers", {}) for entry in old["results"]}
    comparisons = []
    for current_index, old_index in pairs:
        current = results[current_index]["analyzers"]
        previous = old_results.get(old_index, {})
        for analyzer_id in [a for a in previous if a not in current and a in ANALYZERS]:
            notes.append(f"the baseline has {analyzer_id} results for checkpoint {old_index}, this run does not")
        for analyzer_id, result in current.items():
            if analyzer_id not in ANALYZERS:
                continue
            for metric in gateable_metrics(analyzer_id):
                comparison = _compare_metric(analyzer_id, metric, result, previous.get(analyzer_id), baseline)
                if comparison is not None:
                    comparisons.append({"checkpoint": current_index, "baseline_checkpoint": old_index, **comparison})
    return {
        "path": baseline.path,
        "sha256": baseline.sha256,
        "started_at": (old.get("run") or {}).get("started_at"),
        "tolerance": baseline.tolerance,
        "tolerances": dict(baseline.tolerances),
        "noise_multiple": NOISE_MULTIPLE,
        "matched_checkpoints": [list(pair) for pair in pairs],
        "comparisons": comparisons,
        "notes": notes,
    }


def _spec_name(spec: Any) -> Any:
    """Reduce 'path/to/file.py:function' to 'file.py:function'; other specs stay as they are."""
    if not isinstance(spec, str) or ":" not in spec:
        return spec
    path, function = spec.rsplit(":", 1)
    return f"{Path(path).name}:{function}"


def match_checkpoints(
    current: list[Mapping[str, Any]], old: list[Mapping[str, Any]], path: str
) -> tuple[list[tuple[int, int]], list[str]]:
    """Pair checkpoints: a single one with a single one, else by training step, else by position."""
    notes: list[str] = []
    if len(current) == 1 and len(old) == 1:
        return [(0, 0)], notes
    steps_now = [entry.get("step") for entry in current]
    steps_old = [entry.get("step") for entry in old]
    if None not in steps_now and None not in steps_old:
        by_step = {step: index for index, step in enumerate(steps_old)}
        pairs = [(index, by_step[step]) for index, step in enumerate(steps_now) if step in by_step]
        unmatched = [step for step in steps_now if step not in by_step]
        if unmatched:
            notes.append(f"checkpoints at steps {unmatched} have no checkpoint of the same step in the baseline and are not compared")
        if pairs:
            return pairs, notes
    elif len(current) == len(old):
        notes.append("checkpoints are paired by position, because some store no training step")
        return [(index, index) for index in range(len(current))], notes
    raise UsageError(
        f"--baseline {path}: its {len(old)} checkpoint(s) (steps {steps_old}) cannot be paired with this run's "
        f"{len(current)} (steps {steps_now}). Compare runs over the same steps, or a single checkpoint with a single one."
    )


def _compare_metric(
    analyzer_id: str, metric: str, result: Mapping[str, Any], previous: Mapping[str, Any] | None, baseline: Baseline
) -> dict[str, Any] | None:
    analyzer = ANALYZERS[analyzer_id]
    name = f"{analyzer_id}.{metric}"
    value = _number(result.get("metrics", {}).get(metric))
    old_value = _number((previous or {}).get("metrics", {}).get(metric)) if previous else None
    if value is None and old_value is None:
        return None
    worse_when = analyzer.worse_when.get(metric)
    tolerance = baseline.tolerance_for(name)

    entry: dict[str, Any] = {
        "name": name,
        "value": value,
        "baseline_value": old_value,
        "relative_change": None,
        "tolerance": tolerance,
        "worse_when": worse_when,
        "uncertainty": None,
    }
    if previous is None:
        return {**entry, "status": "not compared", "reason": "the baseline has no result of this analyzer here"}
    if value is None or old_value is None:
        missing = "this run" if value is None else "the baseline"
        return {**entry, "status": "not compared", "reason": f"the value is null in {missing}"}

    change = value - old_value
    if old_value != 0:
        entry["relative_change"] = change / abs(old_value)
    noise = math.hypot(analyzer.metric_uncertainty(metric, result), analyzer.metric_uncertainty(metric, previous))
    entry["uncertainty"] = noise
    if worse_when is None:
        return {**entry, "status": "info", "reason": None}

    worse = change if worse_when == "higher" else -change
    allowed = tolerance * abs(old_value)
    if worse > allowed and worse > NOISE_MULTIPLE * noise:
        direction = "rose" if change > 0 else "fell"
        if old_value != 0:
            amount = f"{direction} by {100 * abs(change) / abs(old_value):.3g}%"
        else:
            amount = f"{direction} from 0 to {value:.4g}"
        return {**entry, "status": "fail", "reason": f"{amount}, more than the {100 * tolerance:.3g}% allowed"}
    reason = None
    if worse > allowed:
        reason = f"the change is within {NOISE_MULTIPLE:g} combined standard errors ({noise:.3g}), so it is not counted"
    return {**entry, "status": "pass", "reason": reason}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None
