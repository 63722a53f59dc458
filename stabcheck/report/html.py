"""The self-contained HTML audit report: verdict and gates, one section per analyzer, provenance.

Everything is inline (CSS, PNG plots as data URIs), so the file opens offline and makes no
network requests. Every string that comes from the user or the file system is escaped.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from html import escape
from typing import Any

from stabcheck.report import plots
from stabcheck.report.html_coherence import coherence_section
from stabcheck.report.html_lmc import lmc_section
from stabcheck.report.html_neural import neural_collapse_section
from stabcheck.report.html_parts import analyzer_entries, section_heading
from stabcheck.report.html_parts import badge as _badge
from stabcheck.report.html_parts import cell as _cell
from stabcheck.report.html_parts import metrics_table as _metrics_table
from stabcheck.report.html_parts import notes_list as _notes
from stabcheck.report.html_parts import number_cell as _num
from stabcheck.report.html_parts import table as _table
from stabcheck.report.html_softmax import softmax_section
from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label, format_change, format_percent, format_value, gate_bound

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 60rem;
       color: #1a1a1a; line-height: 1.45; padding: 0 1rem; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.92rem; }
th, td { border: 1px solid #d0d0d0; padding: 0.25rem 0.55rem; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.badge { display: inline-block; padding: 0.1rem 0.6rem; border-radius: 0.8rem; font-weight: 600; }
.pass, .ok { background: #dff3e3; color: #17612c; } .warn { background: #fff3cd; color: #7a5a00; }
.fail, .error { background: #f8d7da; color: #8a1c24; } .inconclusive { background: #eadcf5; color: #5b2a86; }
.skipped { background: #eee; color: #555; }
.notes li { color: #444; } .meaning { color: #333; } code { font-size: 0.88rem; word-break: break-all; }
img { max-width: 100%; } .wide { overflow-x: auto; } td.indices { min-width: 16rem; font-size: 0.85rem; }
@page { margin: 15mm; }
@media print {
  html { font-size: 10pt; }
  body { margin: 0; max-width: none; padding: 0; }
  /* Chromium and Firefox leave out background colours when printing by default, and badges need theirs. */
  .badge, th { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  h2, h3, h4 { break-after: avoid; break-inside: avoid; }
  table, tr, img, li { break-inside: avoid; }
  p, li { orphans: 3; widows: 3; }
  th, td { overflow-wrap: break-word; }
  /* Gate and metric names in a first column wrap only when they cannot fit, unlike paths and hashes. */
  td:first-child code { word-break: normal; }
  /* Paper cannot scroll, so a wide table must fit the page instead. */
  .wide { overflow: visible; }
  td.indices { min-width: 10rem; }
  /* The table of every metric per checkpoint (.per-checkpoint) has one column per
     metric, far too many for a page. Print turns it around, so each table row becomes a grid
     column and subgrid keeps a metric's name level with its values.
     NOTE: each column spans 200 grid rows, so cells past the 200th column would overlap. */
  .per-checkpoint table { display: grid; grid-auto-flow: column; grid-template-columns: fit-content(45%);
                     grid-auto-columns: minmax(0, 1fr); border: solid #d0d0d0; border-width: 1px 0 0 1px;
                     font-size: 0.8rem; }
  .per-checkpoint thead, .per-checkpoint tbody { display: contents; }
  .per-checkpoint tr { display: grid; grid-row: span 200; grid-template-rows: subgrid; }
  .per-checkpoint th, .per-checkpoint td { border-width: 0 1px 1px 0; overflow-wrap: anywhere; }
}
"""


def render_html(report: Report) -> str:
    """Render the whole report as one HTML document."""
    verdict = report.verdict()
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>stabcheck report: {escape(verdict)}</title>",
        f"<style>{STYLE}</style></head><body>",
        "<h1>stabcheck audit report</h1>",
        f"<p>Verdict: {_badge(verdict)} &nbsp; exit code <strong>{report.exit_code}</strong> &nbsp; "
        f"{len(report.checkpoints)} checkpoint(s), model <code>{escape(str(report.model['spec']))}</code>, "
        f"{report.data['num_samples']:,} samples.</p>",
        _gates_section(report),
        _baseline_section(report),
    ]
    for analyzer_id in report.analyzer_ids():
        renderer = SECTION_RENDERERS.get(analyzer_id, _generic_section)
        parts.append(renderer(report, analyzer_id))
    parts.append(_per_layer_section(report))
    if len(report.checkpoints) > 1:
        parts.append(_trajectory_table(report))
    parts.append(_provenance_section(report))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _gates_section(report: Report) -> str:
    strict = " Run with --strict: warnings count as failures." if report.strict else ""
    if not report.gates:
        return f"<section><h2>Gates</h2><p>No gates applied to the analyzers that ran.{strict}</p></section>"
    rows = []
    for gate in report.gates:
        label = checkpoint_label(report.checkpoints[gate["checkpoint"]], gate["checkpoint"])
        rows.append(
            [
                f"<td><code>{escape(gate['name'])}</code></td>",
                _cell(label),
                _num(gate["value"]),
                _cell(gate_bound(gate, "warn")),
                _cell(gate_bound(gate, "fail")),
                f"<td>{_badge(gate['status'])}</td>",
                _cell(gate.get("reason") or ""),
            ]
        )
    intro = f"<p>Each gate compares one metric of one checkpoint with its bounds.{strict}</p>"
    return (
        "<section><h2>Gates</h2>" + intro
        + _table(["gate", "checkpoint", "value", "warn if", "fail if", "status", "reason"], rows) + "</section>"
    )


def _baseline_section(report: Report) -> str:
    """Render the comparison with an earlier report: regressions first, then every compared value."""
    baseline = report.baseline
    if baseline is None:
        return ""
    regressions = report.regressions()
    parts = [
        "<section><h2>Baseline comparison</h2>",
        f"<p>Compared with <code>{escape(baseline['path'])}</code> (SHA-256 <code>{escape(baseline['sha256'])}</code>, "
        f"run started {escape(str(baseline.get('started_at')))}). A metric with a worse direction fails when it moved "
        f"that way by more than its tolerance (default {escape(format_percent(baseline['tolerance']))}) and by more than "
        f"{baseline['noise_multiple']:g} combined standard errors; the other metrics are shown for information. "
        f"Regressions: <strong>{len(regressions)}</strong>.</p>",
    ]

    rows = []
    order = {"fail": 0, "not compared": 1, "pass": 2, "info": 3}
    for entry in sorted(baseline["comparisons"], key=lambda e: order.get(e["status"], 4)):
        label = checkpoint_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
        worse = {"higher": "rise", "lower": "fall"}.get(entry["worse_when"] or "", "none")
        rows.append(
            [
                f"<td><code>{escape(entry['name'])}</code></td>",
                _cell(label),
                _num(entry["baseline_value"]),
                _num(entry["value"]),
                _cell(format_change(entry["relative_change"])),
                _cell(worse),
                _cell(format_percent(entry["tolerance"])),
                f"<td>{_badge(entry['status'])}</td>",
                _cell(entry.get("reason") or ""),
            ]
        )
    parts.append(_table(["metric", "checkpoint", "baseline", "now", "change", "worse", "tolerance", "status", "reason"], rows))
    parts.append(_notes(baseline.get("notes", [])))
    parts.append("</section>")
    return "\n".join(parts)


def _sharpness_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    entries = analyzer_entries(report, analyzer_id)

    if len(entries) > 1:
        has_steps = all(report.checkpoints[index].get("step") is not None for index, _ in entries)
        steps = [report.checkpoints[index]["step"] if has_steps else index for index, _ in entries]
        preconditioned = any(result["metrics"].get("preconditioned_lambda_max") is not None for _, result in entries)
        key = "preconditioned_lambda_max" if preconditioned else "lambda_max"
        uri = plots.trajectory_plot(
            steps,
            [result["metrics"].get(key) for _, result in entries],
            [result["metrics"].get("threshold") for _, result in entries],
            ylabel=key,
            title=f"{key} against the stability threshold",
            xlabel="training step" if has_steps else "checkpoint",
        )
        parts.append(f'<img alt="{escape(key)} over checkpoints" src="{uri}">')

    for index, result in entries:
        label = checkpoint_label(report.checkpoints[index], index)
        metrics = result["metrics"]
        diagnostics = result["diagnostics"]
        parts.append(f"<h3>{escape(label)} {_badge(result['status'])}</h3>")
        threshold, compared = metrics.get("threshold"), metrics.get("preconditioned_lambda_max") or metrics.get("lambda_max")
        if threshold is not None and compared is not None:
            parts.append(
                f"<p>Compared value {escape(format_value(compared))} against threshold "
                f"{escape(format_value(threshold))} ({escape(str(diagnostics.get('threshold_rule', '')))}): "
                f"edge_ratio <strong>{escape(format_value(metrics.get('edge_ratio')))}</strong>.</p>"
            )
        parts.append(_metrics_table({k: v for k, v in metrics.items()}))
        lanczos = diagnostics.get("lanczos")
        if lanczos:
            uri = plots.ritz_value_plot(
                lanczos["top_ritz_values"],
                lanczos["top_residuals"],
                lanczos["ritz_values"],
                threshold,
                preconditioned=metrics.get("preconditioned_lambda_max"),
                title=f"Ritz values, {label}",
            )
            parts.append(f'<img alt="Ritz values and residuals" src="{uri}">')
            rows = [
                [_cell(f"top {rank + 1}"), _num(value), _num(residual)]
                for rank, (value, residual) in enumerate(zip(lanczos["top_ritz_values"], lanczos["top_residuals"]))
            ]
            rows += [
                [_cell("smallest"), _num(value), _num(residual)]
                for value, residual in zip(lanczos["bottom_ritz_values"], lanczos["bottom_residuals"])
            ]
            parts.append(
                "<p>Ritz values with their residual norms |Hy - θy|, recomputed with one extra product "
                "each. Some Hessian eigenvalue lies within the residual of each Ritz value.</p>"
            )
            parts.append(_table(["Ritz value", "value", "residual"], rows))
            parts.append(
                f"<p>Lanczos: {lanczos['iterations']} steps, {lanczos['matvecs']} Hessian-vector products, "
                f"all requested Ritz values converged: {escape(format_value(lanczos['converged']))} "
                f"(tolerance {lanczos['tol']:g} on the residual over the largest Ritz value), seed {lanczos['seed']}. "
                "A value that did not converge is null in the table above and explained in the notes.</p>"
            )
        parts.append(_notes(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)


def _hessian_trace_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    entries = [(e["checkpoint"], e["analyzers"][analyzer_id], e["analyzers"].get("sharpness")) for e in report.results if analyzer_id in e["analyzers"]]
    if len(entries) > 1:
        has_steps = all(report.checkpoints[index].get("step") is not None for index, _, _ in entries)
        steps = [report.checkpoints[index]["step"] if has_steps else index for index, _, _ in entries]
        uri = plots.trajectory_plot(
            steps,
            [result["metrics"].get("trace") for _, result, _ in entries],
            [result["metrics"].get("trace_bound") for _, result, _ in entries],
            ylabel="trace",
            title=(
                "Hessian trace against the SGD bound 2/lr"
                if any(result["metrics"].get("trace_bound") is not None for _, result, _ in entries)
                else "Hessian trace"
            ),
            xlabel="training step" if has_steps else "checkpoint",
        )
        parts.append(f'<img alt="trace over checkpoints" src="{uri}">')
    for index, result, sharpness in entries:
        label = checkpoint_label(report.checkpoints[index], index)
        metrics = result["metrics"]
        parts.append(f"<h3>{escape(label)} {_badge(result['status'])}</h3>")
        table_rows = {k: v for k, v in metrics.items() if k != "spectral_density"}
        table_rows["frobenius_stderr (diagnostic)"] = result["diagnostics"].get("frobenius_stderr")
        parts.append(_metrics_table(table_rows))
        density = metrics.get("spectral_density")
        if density:
            lambda_max = sharpness["metrics"].get("lambda_max") if sharpness else None
            uri = plots.density_plot(
                density["grid"], density["density"], lambda_max=lambda_max,
                threshold=metrics.get("trace_bound"), title=f"Hessian eigenvalue density, {label}",
            )
            parts.append(f'<img alt="spectral density" src="{uri}">')
        estimator = result["diagnostics"].get("trace_estimator", {})
        if estimator:
            parts.append(
                f"<p>{escape(str(estimator.get('method')))}: {estimator.get('num_probes')} probes, "
                f"{estimator.get('matvecs')} Hessian-vector products, seed {estimator.get('seed')}.</p>"
            )
        parts.append(_notes(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)


def _per_layer_section(report: Report) -> str:
    """Render the per-module lambda_max and trace of each checkpoint, when --per-layer ran."""
    parts = []
    for entry in report.results:
        sharpness = entry["analyzers"].get("sharpness", {}).get("diagnostics", {}).get("per_layer")
        traces = entry["analyzers"].get("hessian-trace", {}).get("diagnostics", {}).get("per_layer")
        if not sharpness and not traces:
            continue
        label = checkpoint_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
        by_block: dict[str, dict[str, Any]] = {}
        for row in sharpness or []:
            by_block.setdefault(row["block"], {"num_parameters": row["num_parameters"]})["lambda_max"] = row["lambda_max"]
        for row in traces or []:
            item = by_block.setdefault(row["block"], {"num_parameters": row["num_parameters"]})
            item["trace"], item["trace_stderr"] = row["trace"], row["trace_stderr"]
        rows = [
            [_cell(block), _num(item["num_parameters"]), _num(item.get("lambda_max")), _num(item.get("trace")), _num(item.get("trace_stderr"))]
            for block, item in by_block.items()
        ]
        parts.append(f"<h3>{escape(label)}</h3>")
        parts.append(_table(["module", "parameters", "lambda_max", "trace", "trace stderr"], rows))
        blocks = list(by_block)
        if sharpness:
            uri = plots.per_layer_plot(blocks, [by_block[b].get("lambda_max") for b in blocks], ylabel="lambda_max of the block", title=f"Sharpness per module, {label}")
            parts.append(f'<img alt="lambda_max per module" src="{uri}">')
        if traces:
            uri = plots.per_layer_plot(blocks, [by_block[b].get("trace") for b in blocks], ylabel="trace of the block", title=f"Trace per module, {label}")
            parts.append(f'<img alt="trace per module" src="{uri}">')
    if not parts:
        return ""
    intro = (
        "<p>Each value belongs to the diagonal Hessian block of one module's parameters: the curvature "
        "when only that module moves. The blocks' traces add up to the full trace; their lambda_max "
        "values are each at most the full lambda_max.</p>"
    )
    return "<section><h2>Curvature per module</h2>" + intro + "\n".join(parts) + "</section>"


def _trajectory_table(report: Report) -> str:
    import pandas as pd

    from stabcheck.report.table import metrics_frame

    frame = metrics_frame(report)
    headers = [str(column) for column in frame.columns]
    rows = []
    for record in frame.to_dict("records"):
        cells = []
        for value in record.values():
            if pd.isna(value):
                cells.append(_cell("null"))
            elif isinstance(value, float):
                cells.append(_num(value))
            else:
                cells.append(_cell(value))
        rows.append(cells)
    return (
        "<section><h2>Every metric per checkpoint</h2>"
        f'<div class="wide per-checkpoint">{_table(headers, rows)}</div></section>'
    )


def _generic_section(report: Report, analyzer_id: str) -> str:
    parts = section_heading(analyzer_id)
    for entry in report.results:
        result = entry["analyzers"].get(analyzer_id)
        if result is None:
            continue
        label = checkpoint_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
        parts.append(f"<h3>{escape(label)} {_badge(result['status'])}</h3>")
        parts.append(_metrics_table(result["metrics"]))
        parts.append(_notes(result["notes"]))
    parts.append("</section>")
    return "\n".join(parts)


def _provenance_section(report: Report) -> str:
    run = report.run
    rows = [
        ["command", " ".join(run.get("command") or [])],
        ["started at (UTC)", run["started_at"]],
        ["stabcheck", report.tool["version"]],
        ["torch", run["torch_version"]],
        ["python", run["python_version"]],
        ["libraries", ", ".join(f"{name} {version}" for name, version in (run.get("library_versions") or {}).items())],
        ["host", run["host"]],
        ["platform", run.get("platform", "")],
        ["device", run["device"]],
        ["dtype", run["dtype"]],
        ["seed", run["seed"]],
        ["memory budget (bytes)", f"{run.get('memory_budget_bytes')} ({run.get('memory_budget_source')})"],
        ["model spec", report.model["spec"]],
        ["model kwargs", json.dumps(report.model.get("kwargs", {}))],
        ["trainable parameters", f"{report.model['num_parameters']:,}"],
        ["model mode", report.model["mode"]],
        ["data spec", report.data["spec"]],
        ["data kwargs", json.dumps(report.data.get("kwargs", {}))],
        ["data source", report.data.get("source", "")],
        ["samples analyzed", report.data["num_samples"]],
        ["classes", report.data["num_classes"]],
        ["loss", report.data.get("loss", "")],
        ["training settings", json.dumps(report.training)],
        ["estimator settings", json.dumps(report.estimator)],
        ["config file", run.get("config") or "none"],
        ["gates", "--strict: warnings count as failures" if report.strict else "warnings allowed"],
    ]
    table = _table(["field", "value"], [[_cell(k), f"<td><code>{escape(str(v))}</code></td>"] for k, v in rows])
    checkpoint_rows = [
        [
            _cell(index),
            f"<td><code>{escape(str(entry['path'] or 'in memory (SHA-256 of its state_dict)'))}</code></td>",
            _cell(entry.get("step") if entry.get("step") is not None else ""),
            _cell(entry["format"]),
            _cell(entry.get("weight_set") or ""),
            _cell(entry.get("stripped_prefix") or ""),
            f"<td><code>{escape(str(entry.get('sha256') or ''))}</code></td>",
        ]
        for index, entry in enumerate(report.checkpoints)
    ]
    checkpoints = _table(["#", "path", "step", "format", "weight set", "stripped prefix", "SHA-256"], checkpoint_rows)
    return "<section><h2>Provenance</h2>" + table + "<h3>Checkpoints</h3>" + checkpoints + _notes(report.notes) + "</section>"


SECTION_RENDERERS: dict[str, Callable[[Report, str], str]] = {
    "sharpness": _sharpness_section,
    "hessian-trace": _hessian_trace_section,
    "gradient-coherence": coherence_section,
    "lmc": lmc_section,
    "softmax-collapse": softmax_section,
    "neural-collapse": neural_collapse_section,
}
