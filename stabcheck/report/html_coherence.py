"""The gradient-coherence section of the HTML report: coherence over checkpoints, per class,
per layer, and the groups of examples with opposing gradients."""

from __future__ import annotations

from html import escape
from typing import Any

from stabcheck.analyzers.opposing_signals import OPPOSITION_COSINE
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

# Example indices listed per group in the HTML table; the JSON report lists more.
SHOWN_INDICES = 20


def coherence_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    entries = analyzer_entries(report, analyzer_id)
    if len(entries) > 1:
        steps, xlabel = step_axis(report, [index for index, _ in entries])
        uri = plots.trajectory_plot(
            steps,
            [result["metrics"].get("m_coherence") for _, result in entries],
            [None] * len(entries),
            ylabel="m_coherence",
            title="Gradient coherence over checkpoints (1 = orthogonal gradients)",
            xlabel=xlabel,
            log_y=True,
        )
        parts.append(f'<img alt="m_coherence over checkpoints" src="{uri}">')
    for index, result in entries:
        label = checkpoint_label(report.checkpoints[index], index)
        parts.append(f"<h3>{escape(label)} {badge(result['status'])}</h3>")
        metrics = result["metrics"]
        if metrics:
            parts.append(metrics_table({k: v for k, v in metrics.items() if k != "per_class"}))
        parts.append(_per_class(metrics.get("per_class"), label))
        parts.append(_per_layer(result["diagnostics"].get("per_layer"), label))
        parts.append(_opposing(result["diagnostics"].get("opposing_signals")))
        parts.append(notes_list(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)


def _per_class(per_class: dict[str, Any] | None, label: str) -> str:
    if not per_class:
        return ""
    rows = [
        [cell(name), number_cell(item["num_examples"]), number_cell(item["alpha"]), number_cell(item["m_coherence"])]
        for name, item in per_class.items()
    ]
    counts = [item["num_examples"] for item in per_class.values()]
    imbalance = f"<p>Class sizes range from {min(counts)} to {max(counts)} examples.</p>"
    uri = plots.per_layer_plot(
        list(per_class), [item["m_coherence"] for item in per_class.values()],
        ylabel="m_coherence within the class", title=f"Coherence per class, {label}",
    )
    return (
        "<h4>Per class</h4>" + imbalance + table(["class", "examples", "alpha", "m_coherence"], rows)
        + f'<img alt="m_coherence per class" src="{uri}">'
    )


def _per_layer(per_layer: list[dict[str, Any]] | None, label: str) -> str:
    if not per_layer:
        return ""
    rows = [
        [
            cell(_module_label(row)),
            number_cell(row["num_parameters"]),
            number_cell(row["alpha"]),
            number_cell(row["m_coherence"]),
            number_cell(row["gsnr"]),
            number_cell(row["mean_sq_gradient_norm"]),
        ]
        for row in per_layer
    ]
    uri = plots.per_layer_plot(
        [_module_label(row) for row in per_layer], [row["m_coherence"] for row in per_layer],
        ylabel="m_coherence of the module", title=f"Coherence per module, {label}",
    )
    headers = ["module", "parameters", "alpha", "m_coherence", "gsnr", "mean |g_i|^2"]
    return "<h4>Per module</h4>" + table(headers, rows) + f'<img alt="m_coherence per module" src="{uri}">'


def _percent(value: float | None) -> str:
    return "null" if value is None else f"{value:.1%}"


def _module_label(row: dict[str, Any]) -> str:
    return f"{row['block']} ({row['module_type']})" if row.get("module_type") else row["block"]


def _opposing(opposing: dict[str, Any] | None) -> str:
    if not opposing:
        return ""
    heading = "<h4>Opposing signals</h4>"
    searched = opposing.get("num_candidates", 0)
    if opposing.get("skipped"):
        return heading + f"<p>{escape(opposing['skipped'][:1].upper() + opposing['skipped'][1:])}.</p>"
    if not opposing.get("pairs"):
        return heading + (
            f"<p>No pair of groups with opposing gradients among the {searched} examples with the "
            "largest gradient norms (above the mean).</p>"
        )
    share = opposing.get("candidate_share_of_sq_norm")
    intro = (
        f"<p>Searched the {searched} examples with the largest gradient norms"
        + (f", which carry {share:.1%} of the summed squared gradient norm" if share is not None else "")
        + ". Each pair is two groups whose summed gradients point in opposite directions (cosine "
        f"at most {OPPOSITION_COSINE:g}); indices are positions in the analysis set, largest gradient first.</p>"
    )
    rows = []
    for pair in opposing["pairs"]:
        for side, group in zip(("A", "B"), pair["groups"]):
            listed = ", ".join(str(i) for i in group["indices"][:SHOWN_INDICES])
            if group["size"] > SHOWN_INDICES:
                listed += f", ... ({group['size'] - SHOWN_INDICES} more)"
            classes = ", ".join(f"{name}: {count}" for name, count in (group.get("classes") or {}).items())
            rows.append(
                [
                    cell(f"{pair['rank']}{side}"),
                    number_cell(pair["cosine"]) if side == "A" else cell(""),
                    cell(_percent(pair["share_of_sq_norm"])) if side == "A" else cell(""),
                    number_cell(group["size"]),
                    number_cell(group["mean_gradient_norm"]),
                    number_cell(group["within_cosine"]),
                    cell(classes),
                    f'<td class="indices">{escape(listed)}</td>',
                ]
            )
    headers = ["group", "cosine A vs B", "share of sum |g_i|^2", "size", "mean |g_i|", "mean cosine within", "classes", "example indices"]
    return heading + intro + f'<div class="wide">{table(headers, rows)}</div>'
