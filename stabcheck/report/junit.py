"""JUnit XML with one test case per gate, so CI systems show gate results natively."""

from __future__ import annotations

from xml.etree import ElementTree

from stabcheck.report.model import Report
from stabcheck.report.terminal import checkpoint_label, format_value


def render_junit(report: Report) -> str:
    failures = sum(1 for gate in report.gates if gate["status"] == "fail")
    errors = sum(1 for gate in report.gates if gate["status"] == "inconclusive")
    suite = ElementTree.Element(
        "testsuite",
        name="stabcheck",
        tests=str(len(report.gates)),
        failures=str(failures),
        errors=str(errors),
    )
    for gate in report.gates:
        label = checkpoint_label(report.checkpoints[gate["checkpoint"]], gate["checkpoint"])
        case = ElementTree.SubElement(suite, "testcase", classname=gate["name"], name=label)
        detail = (
            f"{gate['name']} = {format_value(gate['value'])} (warn above {format_value(gate['warn'])}, "
            f"fail above {format_value(gate['fail'])})"
        )
        if gate["status"] == "fail":
            ElementTree.SubElement(case, "failure", message=detail).text = detail
        elif gate["status"] == "inconclusive":
            message = f"{detail}: {gate.get('reason') or 'inconclusive'}"
            ElementTree.SubElement(case, "error", message=message).text = message
        elif gate["status"] == "warn":
            ElementTree.SubElement(case, "system-out").text = f"warning: {detail}"
    return ElementTree.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"
