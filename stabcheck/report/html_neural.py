"""The neural-collapse section of the HTML report: NC1 and NC4 over checkpoints, then each checkpoint's metrics."""

from __future__ import annotations

from html import escape

from stabcheck.report import plots
from stabcheck.report.html_parts import (
    analyzer_entries,
    badge,
    cell,
    metrics_table,
    notes_list,
    number_cell,
    section_heading,
    step_axis,
    table,
)
from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label


def neural_collapse_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    entries = analyzer_entries(report, analyzer_id)
    measured = [(index, result) for index, result in entries if result["metrics"]]
    if len(measured) > 1:
        steps, xlabel = step_axis(report, [index for index, _ in measured])
        for name, title in (("nc1", "NC1: within-class spread over checkpoints"), ("nc4_ncc_mismatch", "NC4: nearest-class-mean mismatch over checkpoints")):
            uri = plots.trajectory_plot(
                steps,
                [result["metrics"][name] for _, result in measured],
                [None] * len(measured),
                ylabel=name,
                title=title + " (log axis when every value is positive)",
                xlabel=xlabel,
                log_y=True,
            )
            parts.append(f'<img alt="{escape(name)} over checkpoints" src="{uri}">')
    for index, result in entries:
        label = checkpoint_label(report.checkpoints[index], index)
        parts.append(f"<h3>{escape(label)} {badge(result['status'])}</h3>")
        if result["metrics"]:
            parts.append(metrics_table(result["metrics"]))
            counts = result["diagnostics"].get("class_counts") or {}
            if counts:
                rows = [[cell(name), number_cell(count)] for name, count in counts.items()]
                imbalance = result["diagnostics"].get("class_imbalance")
                parts.append(f"<p>Class sizes: largest over smallest {imbalance:.3g}.</p>" + table(["class", "samples"], rows))
        parts.append(notes_list(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)
