"""The report document that the JSON, HTML and terminal renderers share (schema version 1)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
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
    # The comparison with a previous report (--baseline), or None.
    baseline: dict[str, Any] | None = None
    strict: bool = False

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
            "baseline": self.baseline,
            "strict": self.strict,
            "exit_code": self.exit_code,
            "notes": self.notes,
        }
        return _finite(document)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Report:
        """Rebuild a report from its JSON document (schema 1), e.g. to judge it again with other gates."""
        if document.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(
                f"the document has report schema version {document.get('schema_version')!r}; this version "
                f"of stabcheck reads version {SCHEMA_VERSION}"
            )
        names = {item.name for item in fields(cls)}
        return cls(**{name: value for name, value in document.items() if name in names})

    @classmethod
    def load(cls, path: str | Path) -> Report:
        """Read a JSON report written by --json or :meth:`write`."""
        import json

        return cls.from_json(json.loads(Path(path).read_text(encoding="utf-8")))

    def write(
        self,
        *,
        json: str | Path | None = None,
        html: str | Path | None = None,
        junit: str | Path | None = None,
        markdown: str | Path | None = None,
        csv: str | Path | None = None,
    ) -> None:
        """Write the chosen report files, each atomically, as the command line does."""
        from stabcheck.report.files import write_reports

        write_reports(self, json=json, html=html, junit=junit, markdown=markdown, csv=csv)

    def metrics(self, analyzer_id: str, checkpoint: int = -1) -> dict[str, Any]:
        """Return the metrics of one analyzer at one checkpoint (default: the last), for notebooks."""
        entry = self.results[checkpoint]["analyzers"].get(analyzer_id)
        if entry is None:
            raise KeyError(f"analyzer {analyzer_id!r} did not run; it ran: {', '.join(self.analyzer_ids())}")
        return dict(entry["metrics"])

    def _repr_html_(self) -> str:
        """Jupyter shows the HTML report in a frame, so its stylesheet stays out of the notebook's page."""
        from html import escape

        from stabcheck.report.html import render_html

        return f'<iframe srcdoc="{escape(render_html(self))}" style="width: 100%; height: 42rem; border: 1px solid #ccc"></iframe>'


    def analyzer_ids(self) -> list[str]:
        ids: list[str] = []
        for entry in self.results:
            for analyzer_id in entry["analyzers"]:
                if analyzer_id not in ids:
                    ids.append(analyzer_id)
        return ids

    def regressions(self) -> list[dict[str, Any]]:
        """Return the baseline comparisons that failed."""
        return [entry for entry in (self.baseline or {}).get("comparisons", []) if entry["status"] == "fail"]

    def verdict(self) -> str:
        """Return the worst status of the run's gates and baseline: fail, inconclusive, warn or pass."""
        statuses = {gate["status"] for gate in self.gates}
        if self.regressions():
            statuses.add("fail")
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
