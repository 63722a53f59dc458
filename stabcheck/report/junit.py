"""JUnit XML with one test case per gate and per baseline check, so CI systems show them natively."""

from __future__ import annotations

from xml.etree import ElementTree

from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label, format_change, format_percent, format_value, gate_bound


def render_junit(report: Report) -> str:
    suites = ElementTree.Element("testsuites", name="stabcheck")
    suites.append(_gate_suite(report))
    if report.baseline is not None:
        suites.append(_baseline_suite(report))
    for attribute in ("tests", "failures", "errors", "skipped"):
        for suite in suites:
            suite.set(attribute, suite.get(attribute, "0"))
        suites.set(attribute, str(sum(int(suite.get(attribute)) for suite in suites)))
    return ElementTree.tostring(suites, encoding="unicode", xml_declaration=True) + "\n"


def _gate_suite(report: Report) -> ElementTree.Element:
    suite = ElementTree.Element("testsuite", name="stabcheck gates")
    for gate in report.gates:
        label = checkpoint_label(report.checkpoints[gate["checkpoint"]], gate["checkpoint"])
        detail = (
            f"{gate['name']} = {format_value(gate['value'])} (warn if {gate_bound(gate, 'warn')}, "
            f"fail if {gate_bound(gate, 'fail')})"
        )
        _add_case(suite, gate["name"], label, gate["status"], detail, gate.get("reason"), failure_type="gate")
    return suite


def _baseline_suite(report: Report) -> ElementTree.Element:
    """Build one test case per metric with a worse direction; the other metrics are not checks."""
    suite = ElementTree.Element("testsuite", name="stabcheck baseline")
    for entry in (report.baseline or {}).get("comparisons", []):
        if entry["worse_when"] is None:
            continue
        label = checkpoint_label(report.checkpoints[entry["checkpoint"]], entry["checkpoint"])
        detail = (
            f"{entry['name']} = {format_value(entry['value'])}, baseline {format_value(entry['baseline_value'])} "
            f"({format_change(entry['relative_change'])}; a {'rise' if entry['worse_when'] == 'higher' else 'fall'} "
            f"of more than {format_percent(entry['tolerance'])} fails)"
        )
        _add_case(suite, f"baseline.{entry['name']}", label, entry["status"], detail, entry.get("reason"), failure_type="regression")
    return suite


def _add_case(
    suite: ElementTree.Element, classname: str, name: str, status: str, detail: str, reason: str | None, *, failure_type: str
) -> None:
    """Add a test case: fail is a failure, inconclusive an error, not compared skipped, the rest passed."""
    case = ElementTree.SubElement(suite, "testcase", classname=classname, name=name)
    if reason:
        detail += f": {reason}"
    if status == "fail":
        ElementTree.SubElement(case, "failure", message=detail, type=failure_type).text = detail
    elif status == "inconclusive":
        ElementTree.SubElement(case, "error", message=detail, type="inconclusive").text = detail
    elif status == "not compared":
        ElementTree.SubElement(case, "skipped", message=detail)
    else:
        ElementTree.SubElement(case, "system-out").text = f"{status}: {detail}"
    counts = {
        "tests": len(suite.findall("testcase")),
        "failures": len(suite.findall("testcase/failure")),
        "errors": len(suite.findall("testcase/error")),
        "skipped": len(suite.findall("testcase/skipped")),
    }
    for key, value in counts.items():
        suite.set(key, str(value))
