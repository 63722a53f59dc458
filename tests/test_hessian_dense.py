"""Hessian-vector products and sharpness against dense float64 Hessians of the zoo cases."""

import numpy as np
import pytest
import torch
from torch.func import functional_call

from cases import CASE_NAMES, dense_hessian, make_case, relative_error
from stabcheck.analyzers.base import AnalysisContext, EstimatorSettings
from stabcheck.analyzers.sharpness import SharpnessAnalyzer, adam_preconditioner_scale
from stabcheck.api import analyze
from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.loading.data import materialize
from stabcheck.loading.optimizer import TrainingSettings


def objective_for(case, weight_decay=None, chunk_size=None):
    return Objective(
        case.model,
        case.inputs,
        case.targets,
        builtin_loss(case.loss),
        weight_decay=weight_decay,
        dtype=torch.float64,
        chunk_size=chunk_size,
    )


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("method", ["retained", "recompute"])
def test_hvp_equals_dense_product(name, method):
    case = make_case(name)
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    operator = HessianOperator(objective_for(case, chunk_size=7), method=method)
    generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        vector = torch.randn(operator.dim, generator=generator, dtype=torch.float64)
        np.testing.assert_allclose(operator.matvec(vector).numpy(), (dense @ vector).numpy(), rtol=1e-9, atol=1e-11)
    assert operator.num_matvecs == 3


def test_weight_decay_adds_to_the_diagonal():
    case = make_case("mlp")
    decay = {"0.weight": 0.3, "2.bias": 0.05}
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss, weight_decay=decay)
    plain = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    operator = HessianOperator(objective_for(case, weight_decay=decay))
    vector = torch.randn(operator.dim, dtype=torch.float64)
    np.testing.assert_allclose(operator.matvec(vector).numpy(), (dense @ vector).numpy(), rtol=1e-9, atol=1e-11)
    difference = torch.diagonal(dense - plain)
    assert set(np.round(difference.numpy(), 12)) == {0.0, 0.3, 0.05}


def test_unused_parameters_are_reported_with_zero_rows():
    case = make_case("unused")
    operator = HessianOperator(objective_for(case))
    assert operator.unused_parameters == ("unused_head.weight", "unused_head.bias")
    product = operator.matvec(torch.ones(operator.dim, dtype=torch.float64))
    head = slice(operator.layout.offsets[4], operator.layout.offsets[6])
    assert torch.count_nonzero(product[head]) == 0
    assert torch.count_nonzero(operator.gradient[head]) == 0


def run_sharpness(case, training=None, **settings):
    objective = objective_for(case)
    context = AnalysisContext(
        model=case.model,
        objective=objective,
        data=materialize((case.inputs, case.targets), max_samples=None),
        training=training or TrainingSettings(optimizer="sgd", lr=0.1, momentum=0.0),
        estimator=EstimatorSettings(lanczos_max_iter=objective.dim, lanczos_tol=1e-10, top_k=3, **settings),
        seed=0,
    )
    try:
        return SharpnessAnalyzer().run(context)
    finally:
        context.release()


@pytest.mark.parametrize("name", CASE_NAMES)
def test_sharpness_matches_eigvalsh(name):
    case = make_case(name)
    eigenvalues = torch.linalg.eigvalsh(dense_hessian(case.model, case.inputs, case.targets, case.loss)).numpy()
    result = run_sharpness(case)
    assert result.status == "ok"
    metrics = result.metrics
    assert relative_error(metrics["lambda_max"], eigenvalues[-1]) < 1e-6
    # A zero eigenvalue (softmax shift invariance) is compared at rounding level of the spectrum.
    assert abs(metrics["lambda_min"] - eigenvalues[0]) <= 1e-6 * abs(eigenvalues[0]) + 1e-12 * eigenvalues[-1]
    distinct_top = []
    for value in eigenvalues[::-1]:
        if not distinct_top or abs(value - distinct_top[-1]) > 1e-8 * abs(eigenvalues[-1]):
            distinct_top.append(value)
    for estimate, reference in zip(metrics["top_eigenvalues"], distinct_top[:3]):
        assert relative_error(estimate, reference) < 1e-6
    assert metrics["threshold"] == pytest.approx(2 / 0.1)
    assert metrics["edge_ratio"] == pytest.approx(metrics["lambda_max"] / 20.0)


def test_preconditioned_sharpness_matches_dense():
    case = make_case("mlp")
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    names = [n for n, _ in case.model.named_parameters()]
    generator = torch.Generator().manual_seed(11)
    exp_avg_sq = {n: torch.rand(p.shape, generator=generator, dtype=torch.float64) * 1e-3 for n, p in case.model.named_parameters()}
    training = TrainingSettings(
        optimizer="adam", lr=1e-3, betas=(0.9, 0.999), eps=1e-8, optimizer_step=40, exp_avg_sq=exp_avg_sq
    )
    scale = adam_preconditioner_scale(training, tuple(names))
    # Independent construction of P from Adam's update rule.
    v = torch.cat([exp_avg_sq[n].reshape(-1) for n in names])
    p_diagonal = (1 - 0.9**40) * (torch.sqrt(v / (1 - 0.999**40)) + 1e-8)
    np.testing.assert_allclose(scale.numpy(), (1 / torch.sqrt(p_diagonal)).numpy(), rtol=1e-12)
    reference = torch.linalg.eigvalsh(dense / torch.sqrt(p_diagonal)[:, None] / torch.sqrt(p_diagonal)[None, :])[-1].item()

    result = run_sharpness(case, training=training)
    assert result.status == "ok"
    assert relative_error(result.metrics["preconditioned_lambda_max"], reference) < 1e-6
    threshold = (2 + 2 * 0.9) / ((1 - 0.9) * 1e-3)
    assert result.metrics["threshold"] == pytest.approx(threshold)
    assert result.metrics["edge_ratio"] == pytest.approx(reference / threshold, rel=1e-6)


def test_unconverged_lanczos_is_inconclusive_and_null():
    case = make_case("cnn_bn")
    objective = objective_for(case)
    context = AnalysisContext(
        model=case.model,
        objective=objective,
        data=materialize((case.inputs, case.targets), max_samples=None),
        training=TrainingSettings(optimizer="sgd", lr=0.1, momentum=0.0),
        estimator=EstimatorSettings(lanczos_max_iter=3, lanczos_tol=1e-12),
        seed=0,
    )
    result = SharpnessAnalyzer().run(context)
    assert result.status == "inconclusive"
    assert result.metrics["lambda_max"] is None
    assert result.metrics["edge_ratio"] is None
    assert any("did not converge" in note for note in result.notes)


def test_analysis_leaves_model_untouched():
    case = make_case("cnn_bn")
    case.model.train()
    before = {k: v.clone() for k, v in case.model.state_dict().items()}
    run_sharpness(case)
    assert case.model.training
    assert all(module.training for module in case.model.modules())
    for key, value in case.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in case.model.parameters())


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "tied"])
def test_restricted_operator_is_the_dense_block(name):
    from stabcheck.engine.hvp import module_blocks, restricted_operator

    case = make_case(name)
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    operator = HessianOperator(objective_for(case))
    blocks = module_blocks(operator.layout.names)
    assert sum(len(members) for members in blocks.values()) == len(operator.layout.names)
    for members in blocks.values():
        matvec, dim = restricted_operator(operator.matvec, operator.layout, members)
        indices = torch.cat([torch.arange(operator.layout.slice(n).start, operator.layout.slice(n).stop) for n in members])
        block = dense[indices][:, indices]
        vector = torch.randn(dim, dtype=torch.float64, generator=torch.Generator().manual_seed(dim))
        np.testing.assert_allclose(matvec(vector).numpy(), (block @ vector).numpy(), rtol=1e-9, atol=1e-11)


def test_batch_statistics_mode_matches_dense_train_mode_hessian():
    """BatchNorm on the statistics of the whole analysis set, dropout off."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(), torch.nn.Dropout(0.5), torch.nn.Linear(6, 3)
    ).double()
    inputs = torch.randn(24, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (24,))
    named = [(n, p) for n, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def objective(theta):
        params, offset = {}, 0
        for name, parameter in named:
            params[name] = theta[offset : offset + parameter.numel()].view(parameter.shape)
            offset += parameter.numel()
        model.train()
        model[3].eval()  # dropout off
        state = {**params, **{n: b.clone() for n, b in buffers.items()}}
        value = torch.nn.functional.cross_entropy(functional_call(model, state, (inputs,)), targets)
        model.eval()
        return value

    dense = torch.autograd.functional.hessian(objective, flat)
    eigenvalues = torch.linalg.eigvalsh((dense + dense.T) / 2)
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    report = analyze(
        model, (inputs, targets), dtype="float64", model_mode="train-bn-batch-stats", analyzers=["sharpness"],
        lr=0.1, estimator=EstimatorSettings(lanczos_max_iter=200),
    )
    metrics = report.results[0]["analyzers"]["sharpness"]["metrics"]
    assert report.model["mode"] == "train-bn-batch-stats"
    assert metrics["lambda_max"] == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, buffers_before[name])
