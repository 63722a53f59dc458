"""The lmc section of the HTML report: the interpolation curves and the per-module barriers."""

from __future__ import annotations

from html import escape
from typing import Any

from stabcheck.report import plots
from stabcheck.report.html_parts import (
    badge,
    cell,
    metrics_table,
    notes_list,
    number_cell,
    section_heading,
    table,
)
from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label


def lmc_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    for entry in report.results:
        result = entry["analyzers"].get(analyzer_id)
        if result is None:
            continue
        index = entry["checkpoint"]
        label = checkpoint_label(report.checkpoints[index], index)
        partner = (result["diagnostics"].get("partner") or {}).get("path")
        heading = f"{label} to {partner}" if partner else label
        parts.append(f"<h3>{escape(heading)} {badge(result['status'])}</h3>")
        metrics = result["metrics"]
        if metrics:
            alignment = result["diagnostics"].get("alignment") or {}
            rows = {
                "barrier": metrics.get("barrier"),
                "accuracy_barrier": metrics.get("accuracy_barrier"),
                "bn_reset": {True: "yes", False: "no"}.get(metrics.get("bn_reset"), "not applicable (no BatchNorm)"),
            }
            if "barrier" in alignment:
                rows["barrier after weight matching"] = alignment["barrier"]
                rows["accuracy_barrier after weight matching"] = alignment["accuracy_barrier"]
            parts.append(metrics_table(rows))
            parts.append(_curves(metrics["curve"], alignment.get("curve"), heading))
            parts.append(_alignment_table(alignment))
            parts.append(_per_layer(result["diagnostics"].get("per_layer"), heading))
        parts.append(notes_list(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)


def _curves(curve: dict[str, Any], aligned: dict[str, Any] | None, heading: str) -> str:
    loss_curves = [("loss", curve["alpha"], curve["loss"])]
    accuracy_curves = [("accuracy", curve["alpha"], curve["accuracy"])]
    if aligned:
        loss_curves.append(("loss after weight matching", aligned["alpha"], aligned["loss"]))
        accuracy_curves.append(("accuracy after weight matching", aligned["alpha"], aligned["accuracy"]))
    parts = [
        f'<img alt="loss along the interpolation" src="{plots.interpolation_plot(loss_curves, ylabel="mean loss", title=f"Loss from A to B, {heading}")}">'
    ]
    if any(value is not None for value in curve["accuracy"]):
        uri = plots.interpolation_plot(accuracy_curves, ylabel="accuracy", title=f"Accuracy from A to B, {heading}")
        parts.append(f'<img alt="accuracy along the interpolation" src="{uri}">')
    return "".join(parts)


def _alignment_table(alignment: dict[str, Any]) -> str:
    if not alignment:
        return ""
    if "skipped" in alignment:
        return f"<p>Weight matching did not run: {escape(alignment['skipped'])}.</p>"
    rows = [
        [
            cell(f"{layer['layer']} ({layer['module_type']})" if layer.get("module_type") else layer["layer"]),
            number_cell(layer["units"]),
            number_cell(layer["units_moved"]),
        ]
        for layer in alignment["layers"]
    ]
    intro = f"<p>Weight matching converged in {alignment['sweeps']} sweep(s) over the hidden layers.</p>"
    return "<h4>Alignment</h4>" + intro + table(["hidden layer", "units", "units moved"], rows)


def _per_layer(rows: list[dict[str, Any]] | None, heading: str) -> str:
    if not rows:
        return ""
    labels = [f"{row['block']} ({row['module_type']})" if row.get("module_type") else row["block"] for row in rows]
    body = [
        [cell(name), number_cell(row["barrier"]), number_cell(row["accuracy_barrier"]), number_cell(row.get("swap_loss_change"))]
        for name, row in zip(labels, rows)
    ]
    barrier_chart = plots.per_layer_plot(labels, [row["barrier"] for row in rows], ylabel="loss barrier", title=f"Barrier per module, {heading}")
    swap_chart = plots.per_layer_plot(
        labels, [row.get("swap_loss_change") for row in rows],
        ylabel="loss change", title=f"Loss change when one module is swapped in from B, {heading}",
    )
    intro = (
        "<p>Each module's tensors are interpolated on their own, with the rest of the network held at "
        "checkpoint A. A module's barrier is measured against the chord of its own curve, from A to A with "
        "that module taken from B; the last column is the loss change of that swap.</p>"
    )
    headers = ["module", "barrier", "accuracy_barrier", "loss change when swapped in from B"]
    images = f'<img alt="barrier per module" src="{barrier_chart}"><img alt="loss change per swapped module" src="{swap_chart}">'
    return "<h4>Barrier per module</h4>" + intro + table(headers, body) + images
