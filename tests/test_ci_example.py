"""The CI example in examples/ci runs as written: its shell steps, on the shipped fixture."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
WORKFLOW = REPOSITORY / "examples" / "ci" / "github-actions.yml"


def workflow_steps(text: str) -> dict[str, str]:
    """Map each step's name to its `run: |` script, read from the workflow's indentation."""
    steps: dict[str, str] = {}
    name, script, indent = None, None, None
    for line in text.splitlines():
        stripped = line.strip()
        if script is not None:
            current = len(line) - len(line.lstrip())
            if stripped and current <= indent:
                steps[name] = "\n".join(script)
                script = None
            else:
                script.append(line[indent + 2 :] if stripped else "")
                continue
        if stripped.startswith("- name:"):
            name = stripped.removeprefix("- name:").strip()
        elif stripped == "run: |" and name is not None:
            script, indent = [], len(line) - len(line.lstrip())
    if script is not None:
        steps[name] = "\n".join(script)
    return steps


def workflow_env(text: str) -> dict[str, str]:
    """Read the top-level env block."""
    env, inside = {}, False
    for line in text.splitlines():
        if line.startswith("env:"):
            inside = True
        elif inside and line.startswith("  ") and ":" in line:
            key, value = line.strip().split(":", 1)
            env[key] = value.strip()
        elif inside and line.strip():
            inside = False
    return env


def test_workflow_steps_run_and_produce_the_reports(tmp_path):
    text = WORKFLOW.read_text()
    steps = workflow_steps(text)
    # The suite's own environment was installed from this checkout with pip, as the step does.
    install = steps["Install stabcheck"].split()
    assert install[:4] == ["python", "-m", "pip", "install"]
    assert install[-1] == "."
    assert "upload-artifact" in text
    assert "path: stabcheck-report/" in text

    # Run in a scratch folder that links to the repository's fixtures and baseline, so nothing is
    # written into the checkout.
    for folder in ("fixtures", "examples"):
        (tmp_path / folder).symlink_to(REPOSITORY / folder)
    summary = tmp_path / "job-summary.md"
    environment = {
        **os.environ,
        **workflow_env(text),
        "GITHUB_STEP_SUMMARY": str(summary),
        # The stabcheck command of the environment that runs the tests.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    assert shutil.which("stabcheck", path=environment["PATH"]), "the stabcheck command is not installed"
    run = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", steps["Run stabcheck"]],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300,
    )
    # The fixture trains at the edge of stability: edge_ratio 1.02 warns, and nothing regressed.
    assert run.returncode == 0, run.stdout + run.stderr
    summary_step = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", steps["Show the summary on the job page"]],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60,
    )
    assert summary_step.returncode == 0, summary_step.stderr

    reports = tmp_path / "stabcheck-report"
    document = json.loads((reports / "report.json").read_text())
    (edge,) = [gate for gate in document["gates"] if gate["name"] == "sharpness.edge_ratio"]
    assert (edge["status"], edge["warn"], edge["fail"]) == ("warn", 0.9, 1.2)
    assert edge["value"] == pytest.approx(1.02, abs=0.01)
    assert document["baseline"]["comparisons"] and not [
        entry for entry in document["baseline"]["comparisons"] if entry["status"] == "fail"
    ]
    suites = ElementTree.parse(reports / "junit.xml").getroot()
    assert suites.get("failures") == "0"
    assert int(suites.get("tests")) >= 5
    assert summary.read_text() == (reports / "summary.md").read_text()
    assert summary.read_text().startswith("## stabcheck: warn (exit code 0)")
    assert (reports / "report.html").read_text().startswith("<!DOCTYPE html>")
