"""A half-precision forward (--forward-dtype) with float32 products, and errors on inf or NaN."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cases import make_case
from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze
from stabcheck.cli import app
from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import NonFiniteError, Objective, builtin_loss
from toy_project import write_toy_project

runner = CliRunner()
LOOSE = EstimatorSettings(lanczos_tol=1e-2, lanczos_max_iter=60, top_k=1)


def float32_case(name: str):
    case = make_case(name)
    return case.model.float(), (case.inputs.float(), case.targets), case.loss


@pytest.mark.parametrize(("forward_dtype", "tolerance"), [("bfloat16", 2e-2), ("float16", 2e-3)])
def test_half_forward_matches_float32(forward_dtype, tolerance):
    model, data, loss = float32_case("mlp")
    reference = analyze(model, data, loss=loss, lr=0.1, analyzers=["sharpness"], estimator=LOOSE)
    mixed = analyze(model, data, loss=loss, lr=0.1, analyzers=["sharpness"], estimator=LOOSE, forward_dtype=forward_dtype)
    expected = reference.metrics("sharpness")["lambda_max"]
    assert mixed.results[0]["analyzers"]["sharpness"]["status"] == "ok"
    assert mixed.metrics("sharpness")["lambda_max"] == pytest.approx(expected, rel=tolerance)
    assert mixed.run["forward_dtype"] == forward_dtype


def test_overflow_names_the_module_and_parameters():
    model, data, loss = float32_case("mlp")
    with torch.no_grad():
        model[0].weight.mul_(1e6)
    report = analyze(model, data, loss=loss, lr=0.1, analyzers=["sharpness"], estimator=LOOSE, forward_dtype="float16")
    result = report.results[0]["analyzers"]["sharpness"]
    assert result["status"] == "error"
    assert "overflowed in float16" in result["notes"][0]
    assert "module '0', parameters 0.weight, 0.bias" in result["notes"][0]
    assert "lambda_max" not in report.metrics("sharpness")
    assert report.exit_code == 3


def test_nonfinite_gradient_names_the_parameters():
    model = nn.Linear(3, 2)
    inputs, targets = torch.randn(8, 3), torch.randn(8, 2)

    def huge_loss(outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ((outputs - target) ** 2).sum(dim=1) * 1e38 * 1e38

    objective = Objective(model, inputs, targets, huge_loss)
    with pytest.raises(NonFiniteError, match="parameter\\(s\\) weight, bias"):
        HessianOperator(objective)


def test_forward_dtype_needs_float32(tmp_path):
    project = write_toy_project(tmp_path / "toy")
    base = ["analyze", str(project.checkpoint), "--model", project.spec("build_model"), "--data", project.spec("load_data")]
    wrong = runner.invoke(app, [*base, "--forward-dtype", "bfloat16", "--dtype", "float64"])
    assert wrong.exit_code == 2
    assert "needs --dtype float32" in " ".join(wrong.output.split())
    unknown = runner.invoke(app, [*base, "--forward-dtype", "int8"])
    assert unknown.exit_code == 2
    assert "use bfloat16 or float16" in " ".join(unknown.output.split())
    output = tmp_path / "r.json"
    mixed = runner.invoke(app, [*base, "--analyzers", "sharpness", "--forward-dtype", "bfloat16", "--json", str(output)])
    assert mixed.exit_code == 0, mixed.output
    document = json.loads(output.read_text())
    assert document["estimator"]["lanczos_tol"] == 1e-2
    assert document["results"][0]["analyzers"]["sharpness"]["status"] == "ok"


def test_builtin_loss_runs_in_float32_after_half_forward():
    model, (inputs, targets), loss = float32_case("mlp")
    objective = Objective(model, inputs, targets, builtin_loss(loss), forward_dtype=torch.bfloat16)
    outputs = objective.outputs(objective.point, inputs)
    assert outputs.dtype == torch.float32
    losses = objective.per_example_losses(objective.point, inputs, targets)
    assert losses.dtype == torch.float32


class TinyAttention(nn.Module):
    """One self-attention head over 3 tokens through scaled_dot_product_attention, and an RNN."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.rnn = nn.GRU(4, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        hidden, _ = self.rnn(attended)
        return self.head(hidden.mean(dim=1))


def test_cuda_kernel_choice_keeps_double_backward():
    """The kernels chosen for CUDA (math attention, cuDNN off for RNNs) give the same Hessian products.

    No GPU is needed: the same context runs on the CPU, where it must not change any number.
    """
    from stabcheck.engine.objective import double_backward_kernels, kernel_notes

    torch.manual_seed(0)
    model = TinyAttention().double()
    inputs, targets = torch.randn(6, 3, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    objective = Objective(model, inputs, targets, builtin_loss("cross_entropy"), dtype=torch.float64)
    vector = torch.randn(objective.dim, dtype=torch.float64)
    plain = HessianOperator(objective).matvec(vector)
    with double_backward_kernels(model, torch.device("cuda")):
        assert not torch.backends.cudnn.enabled
        chosen = HessianOperator(objective).matvec(vector)
    assert torch.backends.cudnn.enabled
    assert torch.equal(plain, chosen)
    notes = kernel_notes(model, torch.device("cuda"))
    assert len(notes) == 2
    assert "math kernel" in notes[0]
    assert kernel_notes(model, torch.device("cpu")) == []


def test_finite_check_names_only_bad_parameter():
    from stabcheck.engine.hvp import _check_finite

    layout = Objective(nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2), builtin_loss("mse")).layout
    vector = torch.ones(layout.dim)
    vector[-1] = float("nan")  # the last entry belongs to the bias
    with pytest.raises(NonFiniteError, match="parameter\\(s\\) bias,"):
        _check_finite(layout, vector, "a product")


def test_finite_check_accepts_overflowing_sum():
    from stabcheck.engine.hvp import _check_finite

    layout = Objective(nn.Linear(3, 2), torch.randn(4, 3), torch.randn(4, 2), builtin_loss("mse")).layout
    # Every entry is finite, but their float32 sum overflows, so the full check must decide.
    vector = torch.full((layout.dim,), 3e38)
    assert not torch.isfinite(vector.sum())
    _check_finite(layout, vector, "a product")
