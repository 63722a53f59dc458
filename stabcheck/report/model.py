"""The report document that the JSON, HTML and terminal renderers share (schema version 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass
class Report:
    """One analysis run: provenance, per-checkpoint analyzer results, gate findings, exit code.

    ``results[i]["analyzers"][id]`` contains ``status``, ``metrics``, ``diagnostics`` and ``notes``
    of analyzer ``id`` on checkpoint ``i``; checkpoints are in trajectory order (by training step).
    """

    tool: dict[str, Any]
    run: dict[str, Any]
    checkpoints: list[dict[str, Any]]
    model: dict[str, Any]
    data: dict[str, Any]
    training: dict[str, Any]
    estimator: dict[str, Any]
    results: list[dict[str, Any]]
    gates: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = 0
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Return the schema-1 document with every non-finite float replaced by None."""
        document = {
            "schema_version": SCHEMA_VERSION,
            "tool": self.tool,
            "run": self.run,
            "checkpoints": self.checkpoints,
            "model": self.model,
            "data": self.data,
            "training": self.training,
            "estimator": self.estimator,
            "results": self.results,
            "gates": self.gates,
            "exit_code": self.exit_code,
            "notes": self.notes,
        }
        return _finite(document)

    def analyzer_ids(self) -> list[str]:
        ids: list[str] = []
        for entry in self.results:
            for analyzer_id in entry["analyzers"]:
                if analyzer_id not in ids:
                    ids.append(analyzer_id)
        return ids

    def verdict(self) -> str:
        """Return the worst gate status of the run: fail, inconclusive, warn or pass."""
        statuses = {gate["status"] for gate in self.gates}
        for status in ("fail", "inconclusive", "warn"):
            if status in statuses:
                return status
        return "pass"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
