"""The JSON report (schema version 1)."""

from __future__ import annotations

import json

from stabcheck.report.model import Report


def render_json(report: Report) -> str:
    return json.dumps(report.to_json(), indent=2, allow_nan=False) + "\n"
