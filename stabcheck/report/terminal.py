"""The rich terminal summary: one table per analyzer with a row per checkpoint, then the gates."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.report.model import Report

STATUS_STYLES = {
    "ok": "green",
    "pass": "green",
    "warn": "yellow",
    "skipped": "dim",
    "inconclusive": "magenta",
    "fail": "bold red",
    "error": "bold red",
}
MAX_NOTES_PER_ANALYZER = 4


def format_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    return str(value)


def gate_bound(gate: dict[str, Any], level: str) -> str:
    """Show a gate's warn or fail bound as the condition that fires it, e.g. '> 1.2' or '< 0.5'."""
    bound = gate.get(level)
    if bound is None:
        return "-"
    return f"{'<' if gate.get('direction') == 'below' else '>'} {format_value(bound)}"


def format_change(value: Any) -> str:
    """Show a relative change as a signed percentage, or 'n/a' when it is undefined."""
    return "n/a" if value is None else f"{100 * value:+.3g}%"


def format_percent(value: float) -> str:
    return f"{100 * value:.3g}%"


def checkpoint_label(entry: dict[str, Any], index: int) -> str:
    if entry.get("path") is None:
        return "in-memory model" if entry.get("step") is None else f"in-memory model (step {entry['step']})"
    name = entry["path"].rsplit("/", 1)[-1]
    return f"{name} (step {entry['step']})" if entry.get("step") is not None else name


def short_label(entry: dict[str, Any], index: int) -> str:
    """Label a checkpoint by its step when it has one, so terminal tables stay narrow."""
    if entry.get("step") is not None:
        return f"step {entry['step']}"
    return checkpoint_label(entry, index)


def render_terminal(report: Report, console: Console) -> None:
    """Print the summary: analyzer tables, one line of meaning per metric, gates and verdict."""
    console.print(
        f"[bold]stabcheck {report.tool['version']}[/bold]  model {report.model['spec']} "
        f"({report.model['num_parameters']:,} parameters, {report.model['mode']} mode)  "
        f"data {report.data['num_samples']:,} samples  dtype {report.run['dtype']}  seed {report.run['seed']}"
    )
    training = report.training
    if training.get("lr") is not None:
        overridden = training.get("overridden") or []
        origin = f"options set {', '.join(overridden)}" if overridden else f"from the {training['source']}"
        console.print(f"training: {training['optimizer']} lr={format_value(training['lr'])} ({origin})", highlight=False)
    for analyzer_id in report.analyzer_ids():
        _render_analyzer(report, analyzer_id, console)
    _render_gates(report, console)


def _render_analyzer(report: Report, analyzer_id: str, console: Console) -> None:
    analyzer = ANALYZERS.get(analyzer_id)
    metric_names = [
        name
        for name in (analyzer.metric_names if analyzer else ())
        if any(_is_shown(entry["analyzers"].get(analyzer_id, {}).get("metrics", {}).get(name)) for entry in report.results)
    ]
    title = analyzer.title if analyzer else analyzer_id
    table = Table(title=f"{title} [dim]({analyzer_id})[/dim]", title_justify="left")
    table.add_column("checkpoint", no_wrap=True)
    table.add_column("status")
    for name in metric_names:
        table.add_column(name, justify="right")
    labels_of_note: dict[str, list[str]] = {}
    entries = [entry for entry in report.results if analyzer_id in entry["analyzers"]]
    for entry in entries:
        result = entry["analyzers"][analyzer_id]
        label = short_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
        status = Text(result["status"], style=STATUS_STYLES.get(result["status"], ""))
        table.add_row(label, status, *(format_value(result["metrics"].get(name)) for name in metric_names))
        for note in result["notes"]:
            labels_of_note.setdefault(note, []).append(label)
    # A note that only some checkpoints have is prefixed with the checkpoints it belongs to.
    notes = [
        note if len(labels) == len(entries) else f"{', '.join(labels)}: {note}"
        for note, labels in labels_of_note.items()
    ]
    console.print(table)
    if analyzer:
        for name in metric_names:
            first_sentence = analyzer.interpretation.get(name, "").split(". ")[0].rstrip(".")
            console.print(f"  [bold]{name}[/bold]: {first_sentence}.", highlight=False)
    for note in notes[:MAX_NOTES_PER_ANALYZER]:
        console.print(f"  [dim]note: {note}[/dim]", highlight=False)
    if len(notes) > MAX_NOTES_PER_ANALYZER:
        hidden = len(notes) - MAX_NOTES_PER_ANALYZER
        console.print(f"  [dim]({hidden} more note{'s' if hidden > 1 else ''} in the JSON and HTML reports)[/dim]")


def _is_shown(value: Any) -> bool:
    return value is not None and not isinstance(value, (list, dict))


def _render_gates(report: Report, console: Console) -> None:
    if report.gates:
        table = Table(title="Gates", title_justify="left")
        table.add_column("gate", no_wrap=True)
        table.add_column("checkpoint", no_wrap=True)
        for column in ("value", "warn if", "fail if"):
            table.add_column(column, justify="right")
        table.add_column("status", no_wrap=True)
        for gate in report.gates:
            label = short_label(report.checkpoints[gate["checkpoint"]], gate["checkpoint"])
            status = Text(gate["status"], style=STATUS_STYLES.get(gate["status"], ""))
            table.add_row(gate["name"], label, format_value(gate["value"]), gate_bound(gate, "warn"), gate_bound(gate, "fail"), status)
        console.print(table)
        for gate in report.gates:
            if gate.get("reason"):
                console.print(f"  [magenta]{gate['name']}[/magenta]: {gate['reason']}", highlight=False)
    if report.baseline is not None:
        _render_baseline(report, console)
    verdict = report.verdict()
    console.print(
        Text(f"verdict: {verdict} (exit code {report.exit_code})", style=STATUS_STYLES.get(verdict, "bold"))
    )


def _render_baseline(report: Report, console: Console) -> None:
    """Print one line on the baseline comparison, then the regressions and the metrics not compared."""
    baseline = report.baseline or {}
    comparisons = baseline.get("comparisons", [])
    judged = [entry for entry in comparisons if entry["worse_when"] is not None and entry["status"] in ("pass", "fail")]
    regressions = report.regressions()
    console.print(
        f"baseline {baseline['path']}: {len(judged)} metric value(s) checked for regressions "
        f"(tolerance {format_percent(baseline['tolerance'])}), {len(regressions)} regression(s)",
        highlight=False,
        style="bold red" if regressions else "green",
    )

    listed = [entry for entry in comparisons if entry["status"] == "fail" or (entry["status"] == "pass" and entry.get("reason"))]
    if listed:
        table = Table(title="Baseline", title_justify="left")
        table.add_column("metric", no_wrap=True)
        table.add_column("checkpoint", no_wrap=True)
        for column in ("baseline", "now", "change"):
            table.add_column(column, justify="right")
        table.add_column("status", no_wrap=True)
        for entry in listed:
            label = short_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
            status = Text(entry["status"], style=STATUS_STYLES.get(entry["status"], ""))
            table.add_row(
                entry["name"], label, format_value(entry["baseline_value"]), format_value(entry["value"]),
                format_change(entry["relative_change"]), status,
            )
        console.print(table)
        for entry in listed:
            console.print(f"  [bold]{entry['name']}[/bold]: {entry['reason']}", highlight=False)

    # Metrics that could not be compared are summarized per analyzer and reason, not listed one by one.
    skipped: dict[tuple[str, str], int] = {}
    for entry in comparisons:
        if entry["status"] == "not compared":
            key = (entry["name"].split(".", 1)[0], entry["reason"])
            skipped[key] = skipped.get(key, 0) + 1
    for (analyzer_id, reason), count in skipped.items():
        console.print(f"  [dim]{analyzer_id}: {count} value(s) not compared, {reason}[/dim]", highlight=False)
    for note in baseline.get("notes", []):
        console.print(f"  [dim]note: {note}[/dim]", highlight=False)
