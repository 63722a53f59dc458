"""Gates, --strict and --baseline: command-line parsing, judging real reports, exit codes, CI outputs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
from typer.testing import CliRunner

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import judge
from stabcheck.baseline import load_baseline
from stabcheck.cli import app
from stabcheck.report.model import Report
from toy_project import ToyProject, write_toy_project

runner = CliRunner()
ANALYZERS = "sharpness,hessian-trace,softmax-collapse"


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ToyProject:
    return write_toy_project(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def report_file(project, tmp_path_factory) -> Path:
    """One real analysis of the toy checkpoint, reused by the tests that only judge it again."""
    output = tmp_path_factory.mktemp("report") / "report.json"
    result = invoke(project, "--json", str(output))
    assert result.exit_code == 0, result.output
    return output


def invoke(project: ToyProject, *extra: str, checkpoints: list[Path] | None = None):
    paths = [str(path) for path in (checkpoints or [project.checkpoint])]
    arguments = [
        "analyze", *paths, "--model", project.spec("build_model"), "--data", project.spec("load_data"),
        "--analyzers", ANALYZERS, "--trace-probes", "40", "--density-probes", "1", "--density-steps", "8", *extra,
    ]
    return runner.invoke(app, arguments)


def load_report(path: Path) -> Report:
    return Report.load(path)


def metric(report: Report, analyzer_id: str, name: str) -> float:
    return report.results[0]["analyzers"][analyzer_id]["metrics"][name]


def gate(report: Report, name: str) -> dict:
    (found,) = [entry for entry in report.gates if entry["name"] == name]
    return found


# Gates on the command line


def test_gate_option_fails_just_below_the_value(project, report_file, tmp_path):
    edge_ratio = metric(load_report(report_file), "sharpness", "edge_ratio")
    junit = tmp_path / "gates.xml"
    failing = invoke(project, "--gate", f"sharpness.edge_ratio<={edge_ratio * 0.99}", "--junit", str(junit))
    assert failing.exit_code == 1, failing.output
    passing = invoke(project, "--gate", f"sharpness.edge_ratio<={edge_ratio * 1.01}")
    assert passing.exit_code == 0, passing.output

    cases = ElementTree.parse(junit).getroot().findall(".//testcase")
    (edge,) = [case for case in cases if case.get("classname") == "sharpness.edge_ratio"]
    message = edge.find("failure").get("message")
    assert f"{edge_ratio:.4g}" in message
    assert f"> {edge_ratio * 0.99:.4g}" in message
    # One test case per gate: the overridden edge ratio and the default collapse gate.
    assert sorted(case.get("classname") for case in cases) == ["sharpness.edge_ratio", "softmax-collapse.sc_fraction"]


def test_lower_bound_gate_fires_below(project, report_file, tmp_path):
    lambda_max = metric(load_report(report_file), "sharpness", "lambda_max")
    output = tmp_path / "r.json"
    result = invoke(project, "--gate", f"sharpness.lambda_max>={lambda_max * 2}", "--json", str(output))
    assert result.exit_code == 1, result.output
    finding = [g for g in json.loads(output.read_text())["gates"] if g["name"] == "sharpness.lambda_max"][0]
    assert finding["direction"] == "below"
    assert finding["status"] == "fail"
    assert invoke(project, "--gate", f"sharpness.lambda_max>={lambda_max / 2}").exit_code == 0


def test_warning_passes_unless_strict(project, report_file, tmp_path):
    edge_ratio = metric(load_report(report_file), "sharpness", "edge_ratio")
    warn = f"sharpness.edge_ratio<={edge_ratio / 2}"
    relaxed = invoke(project, "--gate-warn", warn)
    assert relaxed.exit_code == 0, relaxed.output
    assert "verdict: warn" in relaxed.stdout
    output = tmp_path / "strict.json"
    strict = invoke(project, "--gate-warn", warn, "--strict", "--json", str(output))
    assert strict.exit_code == 1, strict.output
    document = json.loads(output.read_text())
    finding = [g for g in document["gates"] if g["name"] == "sharpness.edge_ratio"][0]
    assert finding["status"] == "fail"
    assert "--strict" in finding["reason"]
    assert document["strict"] is True


def test_strict_from_config_and_gate_switched_off(project, report_file, tmp_path):
    edge_ratio = metric(load_report(report_file), "sharpness", "edge_ratio")
    config = tmp_path / "stabcheck.toml"
    config.write_text(
        f'strict = true\n[gates]\n"sharpness.edge_ratio" = {{ warn = {edge_ratio / 2} }}\n'
        '"softmax-collapse.sc_fraction" = false\n'
    )
    output = tmp_path / "r.json"
    result = invoke(project, "--config", str(config), "--json", str(output))
    assert result.exit_code == 1, result.output
    names = [g["name"] for g in json.loads(output.read_text())["gates"]]
    assert names == ["sharpness.edge_ratio"]
    # The command line replaces the file's gate for the same metric, so the warning is gone.
    assert invoke(project, "--config", str(config), "--gate", "sharpness.edge_ratio<=100").exit_code == 0


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--gate", "sharpnes.edge_ratio<=1", "one of: sharpness, hessian-trace"),
        ("--gate", "sharpness.edge<=1", "valid metrics: lambda_max, lambda_min, threshold, edge_ratio"),
        ("--gate", "hessian-trace.spectral_density<=1", "only single numbers are compared"),
        ("--gate", "sharpness.edge_ratio<1.2", "write 'analyzer-id.metric<=NUMBER'"),
        ("--gate", "sharpness.edge_ratio<=high", "'high' is not a number"),
        ("--gate", "sharpness.edge_ratio=on", "only 'off' is allowed"),
        ("--gate-warn", "sharpness.edge_ratio<=nan", "finite number"),
    ],
)
def test_bad_gate_option_exits_2_before_any_work(project, tmp_path, option, value, message):
    output = tmp_path / "r.json"
    result = invoke(project, option, value, "--json", str(output))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not output.exists()


def test_conflicting_gate_options_exit_2(project):
    both = invoke(project, "--gate", "sharpness.edge_ratio<=1.2", "--gate-warn", "sharpness.edge_ratio>=0.5")
    assert both.exit_code == 2
    assert "one direction" in " ".join(both.output.split())
    inverted = invoke(project, "--gate", "sharpness.edge_ratio<=1.0", "--gate-warn", "sharpness.edge_ratio<=1.5")
    assert inverted.exit_code == 2
    assert "set warn <= fail" in " ".join(inverted.output.split())


# Judging a real report again


def test_judge_lower_bound_gate(report_file):
    report = load_report(report_file)
    lambda_max = metric(report, "sharpness", "lambda_max")
    judged = judge(report, gates={"sharpness.lambda_max": {"warn": lambda_max * 1.5, "fail": lambda_max * 1.1, "direction": "below"}})
    assert gate(judged, "sharpness.lambda_max")["status"] == "fail"
    assert judged.exit_code == 1
    assert report.exit_code == 0
    judged = judge(report, gates={"sharpness.lambda_max": {"warn": lambda_max * 1.5, "fail": lambda_max * 0.5, "direction": "below"}})
    assert gate(judged, "sharpness.lambda_max")["status"] == "warn"
    assert judged.exit_code == 0


def test_gate_on_missing_analyzer_inconclusive(report_file):
    judged = judge(load_report(report_file), gates={"neural-collapse.nc1": {"fail": 0.5}})
    assert gate(judged, "neural-collapse.nc1")["status"] == "inconclusive"
    assert judged.exit_code == 3


# Baselines


def shifted_baseline(report_file: Path, folder: Path, changes: dict[tuple[str, str], float]) -> Path:
    """Copy a real report and multiply some of its metrics, as if an earlier run had measured them."""
    document = json.loads(report_file.read_text())
    for (analyzer_id, name), factor in changes.items():
        document["results"][0]["analyzers"][analyzer_id]["metrics"][name] *= factor
    path = folder / "baseline.json"
    path.write_text(json.dumps(document))
    return path


def comparison(report: Report, name: str) -> dict:
    (found,) = [entry for entry in report.baseline["comparisons"] if entry["name"] == name]
    return found


def test_same_report_as_baseline_has_no_regression(report_file):
    judged = judge(load_report(report_file), baseline=report_file)
    assert judged.exit_code == 0
    assert judged.regressions() == []
    statuses = {entry["name"]: entry["status"] for entry in judged.baseline["comparisons"]}
    assert statuses["sharpness.lambda_max"] == "pass"
    assert statuses["sharpness.threshold"] == "info"
    assert all(entry["relative_change"] in (0.0, None) for entry in judged.baseline["comparisons"])


def test_sharper_than_baseline_fails(report_file, tmp_path):
    report = load_report(report_file)
    baseline = shifted_baseline(report_file, tmp_path, {("sharpness", "lambda_max"): 1 / 1.3})
    judged = judge(report, baseline=baseline)
    entry = comparison(judged, "sharpness.lambda_max")
    assert entry["status"] == "fail"
    assert judged.exit_code == 1
    assert entry["relative_change"] == pytest.approx(0.3)
    assert "rose by 30%" in entry["reason"]
    assert judged.verdict() == "fail"
    # A looser tolerance, for all metrics or for this one, lets the same change pass.
    assert judge(report, baseline=load_baseline(baseline, tolerance=0.5)).exit_code == 0
    loose = load_baseline(baseline, tolerances={"sharpness.lambda_max": 0.35})
    assert comparison(judge(report, baseline=loose), "sharpness.lambda_max")["status"] == "pass"


def test_improvement_and_undirected_changes_never_fail(report_file, tmp_path):
    baseline = shifted_baseline(
        report_file, tmp_path, {("sharpness", "lambda_max"): 2.0, ("sharpness", "threshold"): 0.1}
    )
    judged = judge(load_report(report_file), baseline=baseline)
    assert comparison(judged, "sharpness.lambda_max")["status"] == "pass"
    assert comparison(judged, "sharpness.threshold")["status"] == "info"
    assert judged.exit_code == 0


def test_trace_change_within_its_noise_does_not_fail(report_file, tmp_path):
    report = load_report(report_file)
    trace = metric(report, "hessian-trace", "trace")
    stderr = metric(report, "hessian-trace", "trace_stderr")
    document = json.loads(report_file.read_text())
    metrics = document["results"][0]["analyzers"]["hessian-trace"]["metrics"]
    for shift, expected in ((1.0, "pass"), (5.0, "fail")):
        metrics["trace"] = trace - shift * stderr
        path = tmp_path / f"shift{shift}.json"
        path.write_text(json.dumps(document))
        entry = comparison(judge(report, baseline=load_baseline(path, tolerance=0.0)), "hessian-trace.trace")
        assert entry["status"] == expected, entry
        assert entry["uncertainty"] == pytest.approx(2**0.5 * stderr)
    assert "standard errors" in comparison(
        judge(report, baseline=load_baseline(tmp_path / "shift1.0.json", tolerance=0.0)), "hessian-trace.trace"
    )["reason"]


def test_baseline_from_the_command_line(project, report_file, tmp_path):
    baseline = shifted_baseline(report_file, tmp_path, {("sharpness", "lambda_max"): 0.5})
    markdown, junit = tmp_path / "summary.md", tmp_path / "gates.xml"
    result = invoke(project, "--baseline", str(baseline), "--markdown", str(markdown), "--junit", str(junit))
    assert result.exit_code == 1, result.output
    assert "1 regression(s)" in " ".join(result.stdout.split())
    text = markdown.read_text()
    assert "### Baseline: 1 regression(s)" in text
    assert "| `sharpness.lambda_max` |" in text
    assert "+100%" in text
    regressions = [
        case for case in ElementTree.parse(junit).getroot().findall(".//testcase")
        if case.find("failure") is not None and case.get("classname").startswith("baseline.")
    ]
    assert [case.get("classname") for case in regressions] == ["baseline.sharpness.lambda_max"]
    assert invoke(project, "--baseline", str(baseline), "--baseline-tolerance", "1.5").exit_code == 0


def test_baseline_tolerances_from_config(project, report_file, tmp_path):
    baseline = shifted_baseline(report_file, tmp_path, {("sharpness", "lambda_max"): 0.5})
    config = tmp_path / "stabcheck.toml"
    config.write_text(f'baseline = "{baseline.name}"\n[baseline_tolerances]\n"sharpness.lambda_max" = 1.5\n')
    output = tmp_path / "r.json"
    result = invoke(project, "--config", str(config), "--json", str(output))
    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    assert document["baseline"]["tolerances"] == {"sharpness.lambda_max": 1.5}
    assert Path(document["baseline"]["path"]).resolve() == baseline.resolve()


def test_bad_baseline_exits_2_and_writes_nothing(project, report_file, tmp_path):
    not_json = tmp_path / "report.html"
    not_json.write_text("<html></html>")
    other_schema = tmp_path / "v2.json"
    other_schema.write_text(json.dumps({**json.loads(report_file.read_text()), "schema_version": 2}))
    cases = [
        (tmp_path / "missing.json", "file not found"),
        (not_json, "is not JSON"),
        (other_schema, "schema_version 2"),
    ]
    for path, message in cases:
        output = tmp_path / "r.json"
        result = invoke(project, "--baseline", str(path), "--json", str(output))
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
        assert not output.exists()
    negative = invoke(project, "--baseline", str(report_file), "--baseline-tolerance", "-0.1")
    assert negative.exit_code == 2
    assert "0 or more" in " ".join(negative.output.split())


def continue_training(project: ToyProject, steps: int, path: Path) -> Path:
    """Train the toy checkpoint further with its own optimizer state and save it with its new step."""
    namespace: dict = {}
    exec(compile(project.spec_file.read_text(), str(project.spec_file), "exec"), namespace)
    saved = torch.load(project.checkpoint, weights_only=True)
    network = namespace["build_model"]()
    network.load_state_dict(saved["model_state_dict"])
    optimizer = torch.optim.SGD(network.parameters(), lr=project.lr)
    optimizer.load_state_dict(saved["optimizer_state_dict"])
    inputs, targets = namespace["load_data"]()
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(network(inputs), targets).backward()
        optimizer.step()
    torch.save(
        {"model_state_dict": network.state_dict(), "optimizer_state_dict": optimizer.state_dict(), "step": saved["step"] + steps},
        path,
    )
    return path


def test_trajectory_is_matched_by_step(project, report_file, tmp_path):
    later = continue_training(project, 30, tmp_path / "later.pt")
    output = tmp_path / "r.json"
    result = invoke(project, "--baseline", str(report_file), "--json", str(output), checkpoints=[project.checkpoint, later])
    assert result.exit_code in (0, 1), result.output
    document = json.loads(output.read_text())
    assert document["baseline"]["matched_checkpoints"] == [[0, 0]]
    assert {entry["checkpoint"] for entry in document["baseline"]["comparisons"]} == {0}
    assert any("step" in note and "60" in note for note in document["baseline"]["notes"])
    lambda_max = [e for e in document["baseline"]["comparisons"] if e["name"] == "sharpness.lambda_max"][0]
    assert lambda_max["value"] == pytest.approx(lambda_max["baseline_value"], rel=1e-6)


def test_unpairable_baseline_exits_2(project, report_file, tmp_path):
    document = json.loads(report_file.read_text())
    document["checkpoints"] = [dict(document["checkpoints"][0], step=5), dict(document["checkpoints"][0], step=6)]
    document["results"] = [copy.deepcopy(document["results"][0]), dict(copy.deepcopy(document["results"][0]), checkpoint=1)]
    path = tmp_path / "two.json"
    path.write_text(json.dumps(document))
    result = invoke(project, "--baseline", str(path))
    assert result.exit_code == 2, result.output
    assert "cannot be paired" in " ".join(result.output.split())


# The Python API


def test_python_api_returns_the_report_the_cli_writes(project, report_file, tmp_path):
    import stabcheck

    namespace: dict = {}
    exec(compile(project.spec_file.read_text(), str(project.spec_file), "exec"), namespace)
    report = stabcheck.analyze(
        namespace["build_model"](),
        namespace["load_data"](),
        checkpoints=[project.checkpoint],
        analyzers=ANALYZERS.split(","),
        estimator=EstimatorSettings(trace_probes=40, density_probes=1, density_steps=8),
        baseline=report_file,
    )
    written = json.loads(report_file.read_text())
    assert report.metrics("sharpness") == written["results"][0]["analyzers"]["sharpness"]["metrics"]
    assert report.metrics("hessian-trace")["trace"] == written["results"][0]["analyzers"]["hessian-trace"]["metrics"]["trace"]
    assert report.regressions() == []
    assert report.exit_code == 0
    report.write(json=tmp_path / "api.json", markdown=tmp_path / "api.md")
    assert json.loads((tmp_path / "api.json").read_text())["baseline"]["sha256"] == report.baseline["sha256"]
    assert "srcdoc=" in report._repr_html_()
    with pytest.raises(KeyError, match="did not run"):
        report.metrics("lmc")


# The default lmc gate


def test_lmc_accuracy_gate_warns_on_independent_pair(tmp_path):
    folder = Path(__file__).resolve().parent.parent / "fixtures" / "digits-lmc-independent"
    output = tmp_path / "lmc.json"
    result = runner.invoke(
        app,
        [
            "analyze", str(folder / "init1.pt"), "--lmc-with", str(folder / "init2.pt"),
            "--config", str(folder / "stabcheck.toml"), "--analyzers", "lmc", "--lmc-points", "5",
            "--no-lmc-layers", "--max-samples", "512", "--json", str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    (finding,) = json.loads(output.read_text())["gates"]
    assert finding["name"] == "lmc.accuracy_barrier"
    assert finding["value"] > 0.02
    assert finding["status"] == "warn"


REGRESSION_SPEC = '''
import torch


def build_model():
    return torch.nn.Linear(4, 2)


def load_data():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(64, 4, generator=generator)
    return inputs, inputs[:, :2] * 0.5
'''


def test_lmc_accuracy_gate_skipped_without_labels(tmp_path):
    spec = tmp_path / "regression.py"
    spec.write_text(REGRESSION_SPEC)
    checkpoints = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"model{seed}.pt"
        torch.save(torch.nn.Linear(4, 2).state_dict(), path)
        checkpoints.append(path)
    output = tmp_path / "r.json"
    result = runner.invoke(
        app,
        [
            "analyze", str(checkpoints[0]), "--lmc-with", str(checkpoints[1]), "--model", f"{spec}:build_model",
            "--data", f"{spec}:load_data", "--loss", "mse", "--analyzers", "lmc", "--lmc-points", "5",
            "--json", str(output),
        ],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    assert document["results"][0]["analyzers"]["lmc"]["metrics"]["accuracy_barrier"] is None
    assert document["gates"] == []
    # A gate the user sets on the undefined value still makes the run inconclusive.
    user_gate = runner.invoke(
        app,
        [
            "analyze", str(checkpoints[0]), "--lmc-with", str(checkpoints[1]), "--model", f"{spec}:build_model",
            "--data", f"{spec}:load_data", "--loss", "mse", "--analyzers", "lmc", "--lmc-points", "5",
            "--gate", "lmc.accuracy_barrier<=0.05",
        ],
    )
    assert user_gate.exit_code == 3, user_gate.output


def test_spec_path_difference_ignored(report_file, tmp_path):
    document = json.loads(report_file.read_text())
    spec = document["model"]["spec"]
    document["model"]["spec"] = "/elsewhere/" + Path(spec.rsplit(":", 1)[0]).name + ":" + spec.rsplit(":", 1)[1]
    path = tmp_path / "moved.json"
    path.write_text(json.dumps(document))
    notes = judge(load_report(report_file), baseline=path).baseline["notes"]
    assert not [note for note in notes if "model spec" in note]
    document["model"]["spec"] = spec.rsplit(":", 1)[0] + ":other_function"
    path.write_text(json.dumps(document))
    notes = judge(load_report(report_file), baseline=path).baseline["notes"]
    assert [note for note in notes if "model spec" in note]


def test_config_errors_name_the_file(project, report_file, tmp_path):
    config = tmp_path / "stabcheck.toml"
    config.write_text('[gates]\n"sharpness.edge_rato" = { fail = 1.0 }\n')
    result = invoke(project, "--config", str(config))
    assert result.exit_code == 2
    assert f"config file {config.resolve()}" in " ".join(result.output.split())
    config.write_text(f'baseline = "{report_file}"\n[baseline_tolerances]\n"sharpness.lambda_maxx" = 0.3\n')
    result = invoke(project, "--config", str(config))
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "baseline tolerance 'sharpness.lambda_maxx'" in message
    assert f"config file {config.resolve()}" in message


def test_saved_report_loads_back(report_file):
    report = Report.load(report_file)
    assert report.to_json() == json.loads(report_file.read_text())
