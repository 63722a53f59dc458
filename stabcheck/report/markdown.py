"""A compact Markdown summary for pull-request comments and CI job summaries."""

from __future__ import annotations

from stabcheck.analyzers.registry import ANALYZERS
from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label, format_change, format_percent, format_value, gate_bound


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _status(status: str) -> str:
    return f"**{status}**" if status in ("fail", "inconclusive") else status


def _baseline_lines(report: Report) -> list[str]:
    baseline = report.baseline or {}
    regressions = report.regressions()
    checked = [e for e in baseline.get("comparisons", []) if e["worse_when"] is not None and e["status"] in ("pass", "fail")]
    lines = [
        f"### Baseline: {len(regressions)} regression(s)",
        "",
        f"Compared with `{_escape(baseline['path'])}`: {len(checked)} value(s) checked, a change of more "
        f"than {format_percent(baseline['tolerance'])} in the worse direction fails.",
        "",
    ]
    if regressions:
        lines += ["| metric | checkpoint | baseline | now | change |", "|---|---|---:|---:|---:|"]
        for entry in regressions:
            label = checkpoint_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
            lines.append(
                f"| `{entry['name']}` | {_escape(label)} | {format_value(entry['baseline_value'])} | "
                f"{format_value(entry['value'])} | {format_change(entry['relative_change'])} |"
            )
        lines.append("")
    lines += [f"- {_escape(note)}" for note in baseline.get("notes", [])]
    if baseline.get("notes"):
        lines.append("")
    return lines


def render_markdown(report: Report) -> str:
    strict = " with --strict" if report.strict else ""
    lines = [
        f"## stabcheck: {report.verdict()} (exit code {report.exit_code})",
        "",
        f"{len(report.checkpoints)} checkpoint(s) of `{_escape(str(report.model['spec']))}`, "
        f"{report.data['num_samples']:,} samples, {report.run['dtype']}, stabcheck {report.tool['version']}{strict}.",
        "",
    ]
    if report.gates:
        lines += ["| gate | checkpoint | value | warn if | fail if | status |", "|---|---|---:|---:|---:|---|"]
        for gate in report.gates:
            label = checkpoint_label(report.checkpoints[gate["checkpoint"]], gate["checkpoint"])
            lines.append(
                f"| `{gate['name']}` | {_escape(label)} | {format_value(gate['value'])} | "
                f"{gate_bound(gate, 'warn')} | {gate_bound(gate, 'fail')} | {_status(gate['status'])} |"
            )
        lines.append("")
        reasons = [gate for gate in report.gates if gate.get("reason")]
        lines += [f"- `{gate['name']}`: {_escape(gate['reason'])}" for gate in reasons]
        if reasons:
            lines.append("")
    if report.baseline is not None:
        lines += _baseline_lines(report)
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
