"""Small HTML building blocks shared by the report's sections; every value is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.report.terminal import format_value


def badge(status: str) -> str:
    return f'<span class="badge {escape(status)}">{escape(status)}</span>'


def number_cell(value: Any) -> str:
    return f'<td class="num">{escape(format_value(value))}</td>'


def table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def cell(text: Any) -> str:
    return f"<td>{escape(str(text))}</td>"


def notes_list(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{escape(note)}</li>" for note in notes)
    return f'<ul class="notes">{items}</ul>'


def interpretation(analyzer_id: str) -> str:
    analyzer = ANALYZERS.get(analyzer_id)
    if analyzer is None:
        return ""
    items = "".join(
        f"<li><strong>{escape(name)}</strong>: {escape(text)}</li>" for name, text in analyzer.interpretation.items()
    )
    limits = "".join(f"<li>{escape(text)}</li>" for text in analyzer.limits)
    limits_block = f"<p>Limits:</p><ul>{limits}</ul>" if limits else ""
    return f'<div class="meaning"><p>Source: {escape(analyzer.reference)}.</p><ul>{items}</ul>{limits_block}</div>'


def metrics_table(metrics: dict[str, Any]) -> str:
    rows = [[f"<td>{escape(name)}</td>", number_cell(value)] for name, value in metrics.items()]
    return table(["metric", "value"], rows)


def step_axis(report: Any, indices: list[int]) -> tuple[list[Any], str]:
    """Return the x values of a plot over the given checkpoints and the axis label.

    The stored training steps are used when every checkpoint has one, else the positions.
    """
    if all(report.checkpoints[index].get("step") is not None for index in indices):
        return [report.checkpoints[index]["step"] for index in indices], "training step"
    return list(indices), "checkpoint"


def section_heading(analyzer_id: str) -> list[str]:
    """Return the opening parts of an analyzer's section: its title and what its metrics mean."""
    analyzer = ANALYZERS.get(analyzer_id)
    title = analyzer.title if analyzer else analyzer_id
    return [f"<section><h2>{escape(title)} <small>({escape(analyzer_id)})</small></h2>", interpretation(analyzer_id)]


def analyzer_entries(report: Any, analyzer_id: str) -> list[tuple[int, dict[str, Any]]]:
    """Return (checkpoint index, result) for every checkpoint the analyzer ran on."""
    return [(e["checkpoint"], e["analyzers"][analyzer_id]) for e in report.results if analyzer_id in e["analyzers"]]
