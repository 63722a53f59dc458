"""A compact Markdown summary for pull-request comments and CI job summaries."""

from __future__ import annotations

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label, format_value


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(report: Report) -> str:
    lines = [f"## stabcheck: {report.verdict()} (exit code {report.exit_code})", ""]
    if report.gates:
        lines += ["| gate | checkpoint | value | warn above | fail above | status |", "|---|---|---:|---:|---:|---|"]
        for gate in report.gates:
            label = checkpoint_label(report.checkpoints[gate["checkpoint"]], gate["checkpoint"])
            lines.append(
                f"| `{gate['name']}` | {_escape(label)} | {format_value(gate['value'])} | "
                f"{format_value(gate['warn'])} | {format_value(gate['fail'])} | {gate['status']} |"
            )
        lines.append("")
    for analyzer_id in report.analyzer_ids():
        analyzer = ANALYZERS.get(analyzer_id)
        names = [n for n in (analyzer.metric_names if analyzer else ()) if n not in analyzer.structured_metrics]
        lines += [f"### {analyzer_id}", "", "| checkpoint | status | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
        for entry in report.results:
            result = entry["analyzers"].get(analyzer_id)
            if result is None:
                continue
            label = checkpoint_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
            values = " | ".join(format_value(result["metrics"].get(n)) for n in names)
            lines.append(f"| {_escape(label)} | {result['status']} | {values} |")
        lines.append("")
    return "\n".join(lines)
