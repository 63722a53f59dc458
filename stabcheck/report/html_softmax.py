"""The softmax-collapse section of the HTML report: collapse over checkpoints and per dtype, the
logit-margin histogram against each dtype's collapse margin, and the NLM alignment per module."""

from __future__ import annotations

from html import escape
from typing import Any

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


def softmax_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    entries = analyzer_entries(report, analyzer_id)
    measured = [(index, result) for index, result in entries if result["metrics"]]
    if len(measured) > 1:
        steps, xlabel = step_axis(report, [index for index, _ in measured])
        uri = plots.trajectory_plot(
            steps,
            [result["metrics"]["sc_fraction"] for _, result in measured],
            [None] * len(measured),
            ylabel="sc_fraction",
            title="Share of samples with a collapsed softmax, over checkpoints",
            xlabel=xlabel,
        )
        parts.append(f'<img alt="sc_fraction over checkpoints" src="{uri}">')
    for index, result in entries:
        label = checkpoint_label(report.checkpoints[index], index)
        parts.append(f"<h3>{escape(label)} {badge(result['status'])}</h3>")
        metrics = result["metrics"]
        if metrics:
            nlm = metrics["nlm_alignment"]
            parts.append(
                metrics_table(
                    {
                        "sc_fraction": metrics["sc_fraction"],
                        "zero_loss_fraction": metrics["zero_loss_fraction"],
                        "nlm_alignment (overall)": nlm["overall"],
                        "training accuracy": result["diagnostics"].get("train_accuracy"),
                    }
                )
            )
            parts.append(_by_dtype(metrics))
            parts.append(_margin_histogram(metrics, label))
            parts.append(_nlm_table(nlm["per_layer"]))
        parts.append(notes_list(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)


def _by_dtype(metrics: dict[str, Any]) -> str:
    rows = []
    for name, share in metrics["sc_fraction_by_dtype"].items():
        headroom = metrics["headroom_by_dtype"][name]
        rows.append(
            [
                cell(name),
                number_cell(share),
                number_cell(headroom["collapse_margin"]),
                number_cell(headroom["min"]),
                number_cell(headroom["median"]),
                number_cell(headroom["share_past"]),
            ]
        )
    headers = ["dtype", "sc_fraction", "collapse margin", "min headroom", "median headroom", "share past the margin"]
    intro = "<p>Headroom is the collapse margin minus a sample's gap between its two largest logits; at or below 0 the sample is past it.</p>"
    return "<h4>Per dtype</h4>" + intro + table(headers, rows)


def _margin_histogram(metrics: dict[str, Any], label: str) -> str:
    histogram = metrics["logit_gap"]["histogram"]
    markers = {f"{name} collapse": value["collapse_margin"] for name, value in metrics["headroom_by_dtype"].items()}
    uri = plots.histogram_plot(
        histogram["edges"], histogram["counts"], markers=markers,
        xlabel="gap between the two largest logits", title=f"Logit margins, {label}",
    )
    quantiles = " ".join(f"{name} {value:.4g}" for name, value in metrics["logit_gap"]["quantiles"].items())
    return f"<h4>Logit margins</h4><p>Quantiles: {escape(quantiles)}.</p>" + f'<img alt="logit margin histogram" src="{uri}">'


def _nlm_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    body = [[cell(row["block"]), number_cell(row["cosine"])] for row in rows]
    return "<h4>NLM alignment per module</h4>" + table(["module", "cos(-gradient, weights)"], body)
