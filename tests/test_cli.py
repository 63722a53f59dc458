"""The command line through typer's CliRunner: exit codes, messages and report files."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from xml.etree import ElementTree

import pytest
import torch
from typer.testing import CliRunner

from stabcheck.cli import app
from toy_project import ToyProject, write_toy_project

runner = CliRunner()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> ToyProject:
    return write_toy_project(tmp_path_factory.mktemp("toy"))


def invoke(project: ToyProject, *extra: str, model: str = "build_model", data: str = "load_data"):
    arguments = ["analyze", str(project.checkpoint), "--model", project.spec(model), "--data", project.spec(data), *extra]
    return runner.invoke(app, arguments)


def test_passing_run_writes_every_report(project, tmp_path):
    outputs = {name: tmp_path / name for name in ("r.json", "r.html", "r.xml", "r.md")}
    result = invoke(
        project,
        "--json", str(outputs["r.json"]), "--html", str(outputs["r.html"]),
        "--junit", str(outputs["r.xml"]), "--markdown", str(outputs["r.md"]),
    )
    assert result.exit_code == 0, result.output
    assert "verdict: pass" in result.stdout
    document = json.loads(outputs["r.json"].read_text())
    assert document["schema_version"] == 1
    assert set(document) >= {"tool", "run", "checkpoints", "model", "data", "training", "results", "gates", "exit_code"}
    assert document["exit_code"] == 0
    assert document["training"] == {
        "optimizer": "sgd", "lr": project.lr, "momentum": 0.0, "betas": None,
        "weight_decay": 0.0, "batch_size": None, "source": "checkpoint", "overridden": [],
    }
    sharpness = document["results"][0]["analyzers"]["sharpness"]
    assert sharpness["status"] == "ok"
    assert sharpness["metrics"]["threshold"] == pytest.approx(2 / project.lr)
    assert sharpness["metrics"]["edge_ratio"] == pytest.approx(sharpness["metrics"]["lambda_max"] * project.lr / 2)
    assert document["checkpoints"][0]["sha256"] == hashlib.sha256(project.checkpoint.read_bytes()).hexdigest()
    assert document["model"]["num_parameters"] == 5 * 8 + 8 + 8 * 3 + 3
    assert document["data"]["num_classes"] == 3
    suites = ElementTree.parse(outputs["r.xml"]).getroot()
    assert (suites.tag, suites.get("tests"), suites.get("failures")) == ("testsuites", "2", "0")
    assert "| `sharpness.edge_ratio` |" in outputs["r.md"].read_text()
    html = outputs["r.html"].read_text()
    assert "Ritz value" in html
    assert "data:image/png;base64," in html


def test_json_to_stdout_moves_summary_to_stderr(project):
    result = invoke(project, "--json", "-")
    assert result.exit_code == 0
    document = json.loads(result.stdout)
    assert document["exit_code"] == 0
    assert "verdict: pass" in result.stderr


def test_failed_gate_exits_1(project):
    # An lr far above the stable range makes edge_ratio = lambda_max * lr / 2 exceed 1.2.
    result = invoke(project, "--lr", "100")
    assert result.exit_code == 1, result.output
    assert "fail" in result.stdout


def test_user_gate_from_config_file(project, tmp_path):
    config = tmp_path / "stabcheck.toml"
    config.write_text('[gates]\n"sharpness.lambda_max" = { fail = 1e-9 }\n')
    result = invoke(project, "--config", str(config))
    assert result.exit_code == 1
    assert "sharpness.lambda_max" in result.stdout


def test_unconverged_estimate_exits_3(project, tmp_path):
    output = tmp_path / "r.json"
    result = invoke(project, "--lanczos-iters", "2", "--lanczos-tol", "1e-12", "--json", str(output))
    assert result.exit_code == 3, result.output
    document = json.loads(output.read_text())
    assert document["exit_code"] == 3
    assert document["results"][0]["analyzers"]["sharpness"]["status"] == "inconclusive"
    assert document["results"][0]["analyzers"]["sharpness"]["metrics"]["lambda_max"] is None
    assert document["gates"][0]["status"] == "inconclusive"


def test_missing_learning_rate_is_inconclusive(project, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(project.checkpoint, weights_only=True)["model_state_dict"], bare)
    result = runner.invoke(app, ["analyze", str(bare), "--model", project.spec("build_model"), "--data", project.spec("load_data")])
    assert result.exit_code == 3
    assert "pass --lr" in result.stdout


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--model", "nowhere.py:build_model"], "file not found"),
        (["--model", "{spec}:missing_function"], "has no attribute 'missing_function'"),
        (["--model", "{spec}:not_a_model"], "returned int; expected a torch.nn.Module"),
        (["--model", "{spec}:NOT_CALLABLE"], "'NOT_CALLABLE' is of type int, not a function"),
        (["--model", "{spec}:build_bn_model"], "missing keys (in the model, not in the checkpoint): 1.weight"),
        (["--data", "{spec}:text_data"], "returned a str; expected a DataLoader, a Dataset, or a tuple"),
        (["--model", "no_such_package_xyz.module:build"], "cannot be imported"),
        (["--model-kwargs", "{not json"], "is not valid JSON"),
        (["--model-kwargs", '{"width": 9}'], "has tensors whose shapes differ"),
        (["--data", "{spec}:empty_data"], "returned no examples"),
        (["--loss", "{spec}:summed_loss"], "expected one loss per example"),
        (["--loss", "mse"], "the loss cannot be computed"),
        (["--analyzers", "sharpnes"], "unknown analyzer 'sharpnes'; valid ids: sharpness"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--analyzers", "lmc"], "the lmc analyzer needs a second checkpoint"),
        (["--lmc-consecutive"], "needs at least two checkpoints"),
        (["--lmc-with", "{checkpoint}", "--lmc-points", "2"], "--lmc-points must be at least 3"),
        (["--lmc-with", "{checkpoint}", "--align", "git-rebasin"], "--align 'git-rebasin' is unknown"),
        (["--memory-budget", "12XB"], "--memory-budget '12XB' is invalid: unknown unit 'xb'"),
        (["--per-example-method", "batched"], "--per-example-method 'batched' is unknown"),
        (["--model-mode", "train"], "--model-mode 'train' is unknown"),
        (["--loss-dtype", "float8"], "--loss-dtype 'float8' is unknown"),
        (["--analyzers", "neural-collapse", "--feature-layer", "classifier"], "Linear modules: 0, 2"),
        (
            ["--analyzers", "gradient-coherence", "--model-mode", "train-bn-batch-stats"],
            "per-example gradients are undefined",
        ),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--dtype", "float64", "--lanczos-iters", "1"], "--"),
    ],
)
def test_bad_input_exits_2_with_message(project, arguments, message):
    arguments = [a.replace("{spec}", str(project.spec_file)).replace("{checkpoint}", str(project.checkpoint)) for a in arguments]
    base = {"--model": project.spec("build_model"), "--data": project.spec("load_data")}
    for flag in ("--model", "--data"):
        if flag in arguments:
            base.pop(flag)
    command = ["analyze", str(project.checkpoint)] + [x for pair in base.items() for x in pair] + arguments
    result = runner.invoke(app, command)
    assert result.exit_code == 2, result.output
    assert "error:" in result.stderr
    assert message in " ".join(result.stderr.split())


def test_corrupt_checkpoint_exits_2_and_writes_no_report(project, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(project.checkpoint.read_bytes()[:300])
    existing = tmp_path / "existing.json"
    existing.write_text("previous report")
    fresh = tmp_path / "fresh.html"
    result = runner.invoke(
        app,
        ["analyze", str(broken), "--model", project.spec("build_model"), "--data", project.spec("load_data"),
         "--json", str(existing), "--html", str(fresh)],
    )
    assert result.exit_code == 2
    assert "broken.pt is truncated or corrupt" in " ".join(result.stderr.split())
    assert existing.read_text() == "previous report"
    assert not fresh.exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_non_finite_checkpoint_exits_2(project, tmp_path):
    state = torch.load(project.checkpoint, weights_only=True)
    state["model_state_dict"]["2.bias"][0] = float("nan")
    diverged = tmp_path / "diverged.pt"
    torch.save(state, diverged)
    result = runner.invoke(app, ["analyze", str(diverged), "--model", project.spec("build_model"), "--data", project.spec("load_data")])
    assert result.exit_code == 2
    assert "non-finite values (NaN or inf) in: 2.bias" in " ".join(result.stderr.split())


def test_unsafe_checkpoint_needs_trust_flag(project, tmp_path):
    from test_checkpoint import FileCreatingPayload

    marker = tmp_path / "marker"
    state = torch.load(project.checkpoint, weights_only=True)
    state["payload"] = FileCreatingPayload(marker)
    unsafe = tmp_path / "unsafe.pt"
    torch.save(state, unsafe)
    arguments = ["analyze", str(unsafe), "--model", project.spec("build_model"), "--data", project.spec("load_data")]
    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2
    assert "--trust-checkpoint" in refused.stderr
    assert not marker.exists()
    trusted = runner.invoke(app, arguments + ["--trust-checkpoint"])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists()


def test_config_errors_exit_2(project, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('learning_rate = 0.1\n')
    result = invoke(project, "--config", str(config))
    assert result.exit_code == 2
    assert "unknown keys learning_rate" in result.stderr

    config.write_text('[gates]\n"sharpness.sharp" = { fail = 1 }\n')
    result = invoke(project, "--config", str(config))
    assert result.exit_code == 2
    assert "valid metrics: lambda_max" in " ".join(result.stderr.split())


def test_config_file_specs_are_relative_to_the_file(project, tmp_path, monkeypatch):
    config = project.folder / "stabcheck.toml"
    config.write_text('model = "toyspec.py:build_model"\ndata = "toyspec.py:load_data"\nlr = 0.5\n')
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["analyze", str(project.checkpoint), "--config", str(config)])
    config.unlink()
    assert result.exit_code == 0, result.output


def test_same_seed_gives_same_numbers(project, tmp_path):
    documents = []
    for name in ("a.json", "b.json"):
        result = invoke(project, "--json", str(tmp_path / name), "--seed", "5")
        assert result.exit_code == 0
        documents.append(json.loads((tmp_path / name).read_text()))
    assert documents[0]["results"][0]["analyzers"]["sharpness"]["metrics"]["lambda_max"] is not None
    assert documents[0]["results"] == documents[1]["results"]
    assert documents[0]["gates"] == documents[1]["gates"]
    other = invoke(project, "--json", str(tmp_path / "c.json"), "--seed", "6")
    assert other.exit_code == 0
    diagnostics = json.loads((tmp_path / "c.json").read_text())["results"][0]["analyzers"]["sharpness"]["diagnostics"]
    assert diagnostics["lanczos"]["seed"] == 6


def test_shuffled_loader_gives_same_numbers(project, tmp_path):
    values = []
    for name in ("a.json", "b.json"):
        result = invoke(project, "--data", project.spec("load_loader"), "--json", str(tmp_path / name), "--max-samples", "50")
        assert result.exit_code == 0, result.output
        document = json.loads((tmp_path / name).read_text())
        assert document["data"]["num_samples"] == 50
        values.append(document["results"][0]["analyzers"]["sharpness"]["metrics"])
    assert values[0]["lambda_max"] is not None
    assert values[0] == values[1]


def test_batchnorm_model_and_file_unchanged(tmp_path):
    project = write_toy_project(tmp_path / "bn", model="build_bn_model")
    digest = hashlib.sha256(project.checkpoint.read_bytes()).hexdigest()
    result = invoke(project, "--json", str(tmp_path / "r.json"), model="build_bn_model")
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(project.checkpoint.read_bytes()).hexdigest() == digest
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["model"]["mode"] == "eval"


def test_batch_statistics_mode_skips_coherence(tmp_path):
    project = write_toy_project(tmp_path / "bn", model="build_bn_model")
    result = invoke(project, "--json", str(tmp_path / "r.json"), "--model-mode", "train-bn-batch-stats", model="build_bn_model")
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "r.json").read_text())
    assert document["model"]["mode"] == "train-bn-batch-stats"
    coherence = document["results"][0]["analyzers"]["gradient-coherence"]
    assert coherence["status"] == "skipped"
    assert "BatchNorm uses batch statistics" in coherence["notes"][0]
    assert document["results"][0]["analyzers"]["sharpness"]["status"] == "ok"


def test_coherence_section_in_reports(project, tmp_path):
    result = invoke(project, "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html"), "--memory-budget", "64MiB")
    assert result.exit_code == 0, result.output
    coherence = json.loads((tmp_path / "r.json").read_text())["results"][0]["analyzers"]["gradient-coherence"]
    assert coherence["status"] == "ok"
    assert coherence["diagnostics"]["memory_budget_bytes"] == 64 * 1024**2
    assert set(coherence["metrics"]["per_class"]) == {"0", "1", "2"}
    page = (tmp_path / "r.html").read_text()
    assert "Gradient coherence" in page
    assert "Opposing signals" in page
    assert "gradient-coherence" in result.output


def test_lmc_with_mismatched_checkpoint_exits_2(project, tmp_path):
    wider = tmp_path / "wider.pt"
    torch.save({"state_dict": torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 3)).state_dict()}, wider)
    result = invoke(project, "--lmc-with", str(wider), "--analyzers", "lmc")
    assert result.exit_code == 2, result.output
    assert "0.weight" in " ".join(result.stderr.split())


def test_lmc_consecutive_pairs_a_trajectory(project, tmp_path):
    later = tmp_path / "later.pt"
    state = torch.load(project.checkpoint, weights_only=True)["model_state_dict"]
    torch.save({"state_dict": {k: v * 1.1 if v.is_floating_point() else v for k, v in state.items()}, "step": 99}, later)
    earlier = tmp_path / "earlier.pt"
    torch.save({"state_dict": state, "step": 1}, earlier)
    arguments = ["analyze", str(earlier), str(later), "--model", project.spec("build_model"), "--data", project.spec("load_data"),
                 "--lmc-consecutive", "--analyzers", "lmc", "--json", str(tmp_path / "r.json"), "--html", str(tmp_path / "r.html")]
    result = runner.invoke(app, arguments)
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert results[0]["analyzers"]["lmc"]["status"] == "ok"
    assert results[0]["analyzers"]["lmc"]["diagnostics"]["partner"]["path"] == str(later)
    assert results[1]["analyzers"]["lmc"]["status"] == "skipped"
    assert "no next checkpoint" in results[1]["analyzers"]["lmc"]["notes"][0]
    page = (tmp_path / "r.html").read_text()
    assert "Linear mode connectivity" in page
    assert 'alt="loss along the interpolation"' in page


def test_default_run_has_no_lmc_without_partner(project, tmp_path):
    result = invoke(project, "--json", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "lmc" not in json.loads((tmp_path / "r.json").read_text())["results"][0]["analyzers"]


def test_html_escapes_user_strings_and_fetches_nothing(project, tmp_path):
    output = tmp_path / "r.html"
    result = invoke(project, "--data-kwargs", '{"note": "<script>alert(1)</script>"}', "--html", str(output))
    assert result.exit_code == 0, result.output
    html = output.read_text()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    for marker in ('src="http', "src='http", 'href="http', "@import", "url(http"):
        assert marker not in html


def test_trajectory_is_ordered_by_step(project, tmp_path):
    state = torch.load(project.checkpoint, weights_only=True)
    early, late = tmp_path / "b_early.pt", tmp_path / "a_late.pt"
    torch.save({**state, "step": 10}, early)
    torch.save({**state, "step": 90}, late)
    output = tmp_path / "r.json"
    result = runner.invoke(
        app,
        ["analyze", str(tmp_path), "--model", project.spec("build_model"), "--data", project.spec("load_data"), "--json", str(output)],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    assert [entry["step"] for entry in document["checkpoints"]] == [10, 90]
    assert len(document["results"]) == 2


def test_version_flag():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("stabcheck ")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('"sharpness.top_eigenvalues" = { fail = 0.5 }', "top_eigenvalues is a list, and only single numbers are compared"),
        ('"sharpness.edge_ratio" = { warn = 1.5, fail = 1.0 }', "warn 1.5 is above fail 1,"),
    ],
)
def test_invalid_gates_exit_2(project, tmp_path, table, message):
    config = tmp_path / "stabcheck.toml"
    config.write_text(f"[gates]\n{table}\n")
    result = invoke(project, "--config", str(config))
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())


def test_trajectory_without_steps_keeps_given_order(project, tmp_path):
    state = torch.load(project.checkpoint, weights_only=True)
    with_step, without_step = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save({**state, "step": 90}, with_step)
    torch.save({key: value for key, value in state.items() if key != "step"}, without_step)
    output = tmp_path / "r.json"
    result = runner.invoke(
        app,
        ["analyze", str(without_step), str(with_step), "--model", project.spec("build_model"),
         "--data", project.spec("load_data"), "--json", str(output)],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(output.read_text())
    assert [entry["step"] for entry in document["checkpoints"]] == [None, 90]
    assert any("store no training step" in note for note in document["notes"])


def test_closed_stdout_keeps_the_exit_code(project, tmp_path):
    command = [
        sys.executable, "-m", "stabcheck", "analyze", str(project.checkpoint), "--model", project.spec("build_model"),
        "--data", project.spec("load_data"), "--json", str(tmp_path / "r.json"),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    _, errors = process.communicate(timeout=120)
    # click turns a broken pipe into exit code 1, which CI would read as a failed gate.
    assert process.returncode == 0, errors.decode()
    assert json.loads((tmp_path / "r.json").read_text())["exit_code"] == 0


def test_reports_get_the_usual_file_mode(project, tmp_path):
    output = tmp_path / "r.json"
    result = invoke(project, "--json", str(output))
    assert result.exit_code == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(output.stat().st_mode) == 0o666 & ~umask


def test_csv_has_a_row_per_checkpoint(project, tmp_path):
    import pandas as pd

    state = torch.load(project.checkpoint, weights_only=True)
    for step in (30, 10):
        torch.save({**state, "step": step}, tmp_path / f"ck{step}.pt")
    output, document_path = tmp_path / "metrics.csv", tmp_path / "r.json"
    result = runner.invoke(
        app,
        ["analyze", str(tmp_path / "ck30.pt"), str(tmp_path / "ck10.pt"), "--model", project.spec("build_model"),
         "--data", project.spec("load_data"), "--csv", str(output), "--json", str(document_path)],
    )
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(output)
    document = json.loads(document_path.read_text())
    assert list(frame["step"]) == [10, 30]
    assert "sharpness.top_eigenvalues" not in frame.columns
    assert list(frame["sharpness.status"]) == ["ok", "ok"]
    for row, entry in zip(frame.to_dict("records"), document["results"]):
        expected = entry["analyzers"]["sharpness"]["metrics"]["lambda_max"]
        assert row["sharpness.lambda_max"] == pytest.approx(expected, rel=1e-12)
