"""The per-checkpoint metrics table of a report, as a pandas DataFrame and as CSV."""

from __future__ import annotations

import pandas as pd

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.report.model import Report


def metrics_frame(report: Report) -> pd.DataFrame:
    """Return one row per checkpoint and one column per scalar metric, named ``analyzer.metric``.

    List-valued metrics (such as ``top_eigenvalues``) are left out. Each analyzer's status gets an
    ``analyzer.status`` column, which separates a null metric from a skipped analyzer.
    """
    rows = []
    for entry in report.results:
        checkpoint = report.checkpoints[entry["checkpoint"]]
        row = {"checkpoint": entry["checkpoint"], "path": checkpoint.get("path"), "step": checkpoint.get("step")}
        for analyzer_id, result in entry["analyzers"].items():
            row[f"{analyzer_id}.status"] = result["status"]
            analyzer = ANALYZERS.get(analyzer_id)
            structured = analyzer.structured_metrics if analyzer else ()
            for name, value in result["metrics"].items():
                if name in structured or isinstance(value, (list, dict)):
                    continue
                row[f"{analyzer_id}.{name}"] = value
            if "frobenius_stderr" in result["diagnostics"]:
                row[f"{analyzer_id}.frobenius_stderr"] = result["diagnostics"]["frobenius_stderr"]
        rows.append(row)
    frame = pd.DataFrame(rows)
    # Integer steps with a missing value would otherwise turn into floats.
    frame["step"] = frame["step"].astype("Int64")
    return frame


def render_csv(report: Report) -> str:
    return metrics_frame(report).to_csv(index=False)
