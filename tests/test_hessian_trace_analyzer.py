"""The hessian-trace analyzer end to end on zoo models with dense float64 references."""

import math

import pytest
import torch

from cases import dense_hessian, make_case
from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze


def run(case, **settings):
    estimator = EstimatorSettings(**settings)
    report = analyze(
        case.model,
        (case.inputs, case.targets),
        loss=case.loss,
        dtype="float64",
        analyzers=["hessian-trace"],
        lr=0.05,
        batch_size=8,
        estimator=estimator,
    )
    return report.results[0]["analyzers"]["hessian-trace"]


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_trace_and_frobenius_match_dense(name):
    case = make_case(name)
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    result = run(case, trace_probes=400)
    metrics = result["metrics"]
    assert result["status"] == "ok"
    assert abs(metrics["trace"] - float(torch.trace(dense))) <= 3 * metrics["trace_stderr"]
    frobenius = float(torch.linalg.matrix_norm(dense))
    frobenius_stderr = result["diagnostics"]["frobenius_stderr"]
    assert abs(metrics["frobenius_norm"] - frobenius) <= 3 * frobenius_stderr


def test_bounds_follow_lr_and_batch_size():
    result = run(make_case("mlp"), trace_probes=50)
    metrics = result["metrics"]
    assert metrics["trace_bound"] == pytest.approx(2 / 0.05)
    assert metrics["trace_ratio"] == pytest.approx(metrics["trace"] / 40.0)
    assert metrics["frobenius_ratio"] == pytest.approx(metrics["frobenius_norm"] / (math.sqrt(8) / 0.05))
    assert result["diagnostics"]["batch_size_source"] == "options"


def test_spectral_density_covers_the_dense_spectrum():
    case = make_case("mlp")
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(case.model, case.inputs, case.targets, case.loss))
    result = run(case, trace_probes=20, density_probes=2, density_steps=60)
    density = result["metrics"]["spectral_density"]
    largest_node = max(max(probe) for probe in density["nodes"])
    assert largest_node == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    for weights in density["weights"]:
        assert sum(weights) == pytest.approx(1.0, abs=1e-10)


def test_unreached_precision_is_inconclusive():
    result = run(make_case("mlp"), trace_rel_stderr=1e-6, trace_max_probes=30)
    assert result["status"] == "inconclusive"
    assert any("did not reach" in note for note in result["notes"])


def test_momentum_has_no_trace_bound():
    case = make_case("mlp")
    report = analyze(
        case.model, (case.inputs, case.targets), dtype="float64", analyzers=["hessian-trace"],
        lr=0.05, momentum=0.9, batch_size=8, estimator=EstimatorSettings(trace_probes=10),
    )
    result = report.results[0]["analyzers"]["hessian-trace"]
    assert result["metrics"]["trace_bound"] is None
    assert result["metrics"]["trace_ratio"] is None
    assert result["metrics"]["frobenius_ratio"] is None
    assert result["metrics"]["frobenius_norm"] is not None


def test_per_layer_values_match_dense_blocks():
    from stabcheck.engine.hvp import module_blocks

    case = make_case("cnn_bn")
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    report = analyze(
        case.model, (case.inputs, case.targets), loss=case.loss, dtype="float64", lr=0.05,
        estimator=EstimatorSettings(per_layer=True, trace_probes=300, lanczos_tol=1e-10, lanczos_max_iter=200),
    )
    analyzers = report.results[0]["analyzers"]
    names = [name for name, p in case.model.named_parameters()]
    offsets = [0]
    for _, parameter in case.model.named_parameters():
        offsets.append(offsets[-1] + parameter.numel())
    blocks = module_blocks(tuple(names))
    sharpness_rows = {row["block"]: row for row in analyzers["sharpness"]["diagnostics"]["per_layer"]}
    trace_rows = {row["block"]: row for row in analyzers["hessian-trace"]["diagnostics"]["per_layer"]}
    assert list(sharpness_rows) == list(blocks)
    for module, members in blocks.items():
        indices = torch.cat([torch.arange(offsets[names.index(n)], offsets[names.index(n) + 1]) for n in members])
        block = dense[indices][:, indices]
        assert sharpness_rows[module]["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(block)[-1]), rel=1e-6)
        row = trace_rows[module]
        assert abs(row["trace"] - float(torch.trace(block))) <= 3 * row["trace_stderr"] + 1e-12


def test_batch_size_comes_from_checkpoint_then_options(tmp_path):
    case = make_case("mlp")
    path = tmp_path / "run.ckpt"
    torch.save({"state_dict": case.model.state_dict(), "hyper_parameters": {"batch_size": 16}}, path)
    common = dict(loss=case.loss, dtype="float64", analyzers=["hessian-trace"], lr=0.05, estimator=EstimatorSettings(trace_probes=10))
    from_file = analyze(case.model, (case.inputs, case.targets), checkpoints=[path], **common)
    diagnostics = from_file.results[0]["analyzers"]["hessian-trace"]["diagnostics"]
    assert diagnostics["batch_size"] == 16
    assert diagnostics["batch_size_source"] == "checkpoint"
    overridden = analyze(case.model, (case.inputs, case.targets), checkpoints=[path], batch_size=4, **common)
    diagnostics = overridden.results[0]["analyzers"]["hessian-trace"]["diagnostics"]
    assert diagnostics["batch_size"] == 4
    assert diagnostics["batch_size_source"] == "options"


def test_batch_size_from_a_data_loader():
    case = make_case("mlp")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(case.inputs, case.targets), batch_size=5, shuffle=True)
    report = analyze(case.model, loader, dtype="float64", analyzers=["hessian-trace"], lr=0.05, estimator=EstimatorSettings(trace_probes=10))
    diagnostics = report.results[0]["analyzers"]["hessian-trace"]["diagnostics"]
    assert diagnostics["batch_size"] == 5
    assert diagnostics["batch_size_source"] == "data loader"
    notes = report.results[0]["analyzers"]["hessian-trace"]["notes"]
    assert "frobenius_ratio uses batch size B=5 from the data loader" in notes


@pytest.mark.parametrize("name", ["mlp", "cnn_bn"])
def test_deflated_method_matches_dense(name):
    case = make_case(name)
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    result = run(case, trace_method="deflated", trace_rel_stderr=0.002, trace_max_probes=2000)
    metrics = result["metrics"]
    estimator = result["diagnostics"]["trace_estimator"]
    assert result["status"] == "ok"
    assert estimator["method"] == "deflated"
    assert estimator["reached_target"]
    assert metrics["trace_stderr"] <= 0.002 * abs(metrics["trace"])
    assert abs(metrics["trace"] - float(torch.trace(dense))) <= 3 * metrics["trace_stderr"]
    frobenius = float(torch.linalg.matrix_norm(dense))
    assert abs(metrics["frobenius_norm"] - frobenius) <= 3 * result["diagnostics"]["frobenius_stderr"]
    # Pilot, basis and probes, plus at most two discarded deflated pilots of 30 when the basis grew again.
    used = 30 + estimator["basis_size"] + estimator["num_probes"]
    assert used <= estimator["matvecs"] <= used + 60


def test_memory_budget_caps_the_deflation_basis():
    from stabcheck.engine.hvp import estimate_operator_bytes, saved_bytes_fit
    from stabcheck.engine.objective import Objective, builtin_loss

    case = make_case("mlp")
    settings = {"trace_method": "deflated", "trace_rel_stderr": 0.02, "trace_max_probes": 2000, "density_steps": 4}
    roomy = run(case, **settings)
    assert roomy["diagnostics"]["trace_estimator"]["basis_size"] > 8
    objective = Objective(case.model, case.inputs, case.targets, builtin_loss(case.loss), dtype=torch.float64)
    graph = estimate_operator_bytes(objective, "retained", saved_bytes_fit(objective, create_graph=True))
    vector = objective.dim * 8
    # Room for the graph, the estimator's 4 work vectors and 8 basis vectors (the density's
    # basis of 4 steps needs 8 vectors, so the analyzer itself fits).
    tight = run(case, **settings, memory_budget=int(graph + 12 * vector + vector // 2))
    estimator = tight["diagnostics"]["trace_estimator"]
    assert tight["status"] == "ok"
    assert estimator["basis_size"] == 8
    assert any("capped the deflation basis at 8 vectors" in note for note in tight["notes"])
    # The capped run still reaches the target, with more probes, and agrees with the dense trace.
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    assert estimator["reached_target"]
    assert estimator["num_probes"] > roomy["diagnostics"]["trace_estimator"]["num_probes"]
    assert abs(tight["metrics"]["trace"] - float(torch.trace(dense))) <= 3 * tight["metrics"]["trace_stderr"]


def test_cap_note_only_when_the_cap_binds():
    # A roomy budget leaves the basis where the plan stopped it, with no cap note.
    result = run(make_case("mlp"), trace_method="deflated", trace_rel_stderr=0.02, trace_max_probes=2000, memory_budget=10**9)
    assert not any("capped the deflation basis" in note for note in result["notes"])


def test_few_probes_warn_about_the_error_bar():
    result = run(make_case("cnn_bn"), trace_probes=10)
    assert any("comes from 10 probes" in note for note in result["notes"])
