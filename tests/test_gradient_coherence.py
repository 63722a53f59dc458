"""The gradient-coherence analyzer on constructed cases, zoo models and the label fixtures."""

from pathlib import Path

import pytest
import torch
from cases import make_case
from test_fixtures import load_module
from torch import nn

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.analyzers.opposing_signals import find_opposing_pairs
from stabcheck.api import analyze
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.per_example import per_example_gradients

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def coherence(model, inputs, targets, loss="mse", **settings):
    report = analyze(
        model,
        (inputs, targets),
        loss=loss,
        dtype="float64",
        analyzers=["gradient-coherence"],
        estimator=EstimatorSettings(**settings),
    )
    return report.results[0]["analyzers"]["gradient-coherence"]


def test_identical_examples_give_m():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    inputs = torch.randn(1, 3, dtype=torch.float64).repeat(6, 1)
    targets = torch.ones(6, 2, dtype=torch.float64)
    result = coherence(model, inputs, targets)
    assert result["status"] == "ok"
    assert result["metrics"]["m_coherence"] == pytest.approx(6.0, rel=1e-12)
    assert result["metrics"]["alpha"] == pytest.approx(1.0, rel=1e-12)
    assert result["metrics"]["num_examples"] == 6
    assert result["metrics"]["gsnr"] is None
    assert any("GSNR is undefined" in note for note in result["notes"])


def test_orthogonal_gradients_give_one():
    model = nn.Linear(5, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.3)
    inputs = torch.diag(torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64))
    targets = torch.tensor([[2.0], [-1.0], [0.7], [4.0], [-2.0]], dtype=torch.float64)
    result = coherence(model, inputs, targets)
    assert result["metrics"]["m_coherence"] == pytest.approx(1.0, rel=1e-12)
    assert result["metrics"]["alpha"] == pytest.approx(1.0 / 5, rel=1e-12)


def test_metrics_match_loop_reference():
    case = make_case("cnn_bn")
    result = coherence(case.model, case.inputs, case.targets, loss=case.loss)
    objective = Objective(case.model, case.inputs, case.targets, builtin_loss(case.loss), dtype=torch.float64)
    grads = per_example_gradients(objective, torch.arange(objective.num_samples), method="loop")
    m = grads.shape[0]
    expected = float(grads.sum(0).pow(2).sum() / grads.pow(2).sum())
    assert result["metrics"]["m_coherence"] == pytest.approx(expected, rel=1e-10)
    assert result["metrics"]["alpha"] == pytest.approx(expected / m, rel=1e-10)

    mean = grads.mean(0)
    variance = grads.var(0, unbiased=False)
    varying = variance > 1e-12 * grads.pow(2).mean(0)
    assert result["metrics"]["gsnr"] == pytest.approx(float((mean[varying] ** 2 / variance[varying]).mean()), rel=1e-8)

    for label, row in result["metrics"]["per_class"].items():
        members = grads[case.targets == int(label)]
        assert row["num_examples"] == members.shape[0]
        class_expected = float(members.sum(0).pow(2).sum() / members.pow(2).sum())
        assert row["m_coherence"] == pytest.approx(class_expected, rel=1e-10)

    blocks = {row["block"]: row for row in result["diagnostics"]["per_layer"]}
    first_layer = grads[:, : 3 * 9 + 3]
    assert blocks["0"]["m_coherence"] == pytest.approx(
        float(first_layer.sum(0).pow(2).sum() / first_layer.pow(2).sum()), rel=1e-10
    )


def opposing_problem():
    """Regression with two groups of large, opposite gradients among small orthogonal ones."""
    generator = torch.Generator().manual_seed(3)
    dim, direction = 12, torch.zeros(12, dtype=torch.float64)
    direction[0] = 1.0
    def noise(count, scale):
        values = torch.randn(count, dim, generator=generator, dtype=torch.float64) * scale
        values[:, 0] = 0.0  # orthogonal to the shared direction
        return values

    pulls_up = 5 * direction + noise(6, 0.2)
    pulls_down = 5 * direction + noise(4, 0.2)
    others = noise(30, 0.3)
    inputs = torch.cat([others[:15], pulls_up, others[15:], pulls_down])
    targets = torch.cat(
        [torch.full((15, 1), 0.05), torch.full((6, 1), 1.0), torch.full((15, 1), -0.05), torch.full((4, 1), -1.0)]
    ).double()
    model = nn.Linear(dim, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    return model, inputs, targets


def test_opposing_groups_are_found():
    model, inputs, targets = opposing_problem()
    result = coherence(model, inputs, targets)
    pairs = result["diagnostics"]["opposing_signals"]["pairs"]
    assert len(pairs) == 1
    first, second = pairs[0]["groups"]
    assert sorted(first["indices"]) == list(range(15, 21))
    assert sorted(second["indices"]) == list(range(36, 40))
    assert pairs[0]["cosine"] < -0.99
    assert first["size"] == 6
    assert second["size"] == 4
    assert pairs[0]["share_of_sq_norm"] > 0.9


def test_aligned_gradients_have_no_opposing_pair():
    gram = torch.full((8, 8), 0.6, dtype=torch.float64) + 0.4 * torch.eye(8, dtype=torch.float64)
    assert find_opposing_pairs(gram, max_pairs=3) == []


def test_opposing_search_can_be_turned_off():
    model, inputs, targets = opposing_problem()
    result = coherence(model, inputs, targets, opposing_groups=0)
    opposing = result["diagnostics"]["opposing_signals"]
    assert opposing["num_candidates"] == 0
    assert opposing["pairs"] == []
    assert "--opposing-groups 0" in opposing["skipped"]


def test_tiny_memory_budget_skips_with_estimate():
    case = make_case("mlp")
    result = coherence(case.model, case.inputs, case.targets, loss=case.loss, memory_budget=2000)
    assert result["status"] == "skipped"
    assert "memory budget" in result["notes"][0]


def fixture_coherence(folder: str) -> list[float]:
    path = FIXTURES / folder
    model = load_module(path / "model.py").build_model()
    data = load_module(path / "data.py").load_data()
    report = analyze(
        model,
        data,
        checkpoints=sorted(path.glob("epoch-*.pt")),
        analyzers=["gradient-coherence"],
        max_samples=512,
        estimator=EstimatorSettings(opposing_groups=0),
    )
    return [entry["analyzers"]["gradient-coherence"]["metrics"]["m_coherence"] for entry in report.results]


def test_true_labels_are_more_coherent_than_shuffled():
    true_labels = fixture_coherence("digits-true-labels")
    shuffled = fixture_coherence("digits-shuffled-labels")
    assert len(true_labels) == len(shuffled) == 3
    for real, random in zip(true_labels, shuffled):
        assert real > 2 * random


def test_opposing_pair_found_beside_common_direction():
    """Planted opposite groups among many examples that share one dominant direction."""
    generator = torch.Generator().manual_seed(5)
    dim = 30
    common = torch.zeros(dim, dtype=torch.float64)
    common[0] = 1.0
    signal = torch.zeros(dim, dtype=torch.float64)
    signal[1] = 1.0

    def noisy(center, count, scale):
        return center + scale * torch.randn(count, dim, generator=generator, dtype=torch.float64)

    background = noisy(2.0 * common, 60, 0.6)
    pulls_up = noisy(0.3 * common + signal, 10, 0.1)
    pulls_down = noisy(0.3 * common - signal, 8, 0.1)
    gradients = torch.cat([background, pulls_up, pulls_down])
    pairs = find_opposing_pairs(gradients @ gradients.T, max_pairs=3)
    assert len(pairs) >= 1
    found = {tuple(sorted(pairs[0].first.tolist())), tuple(sorted(pairs[0].second.tolist()))}
    assert found == {tuple(range(60, 70)), tuple(range(70, 78))}
    assert pairs[0].cosine < -0.5


class KeyQueryAttention(torch.nn.Module):
    """Self-attention whose key bias has a zero gradient in exact arithmetic (softmax ignores it)."""

    def __init__(self) -> None:
        super().__init__()
        self.query = torch.nn.Linear(4, 8)
        self.key = torch.nn.Linear(4, 8)
        self.value = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(1, 2) / 8**0.5, dim=-1)
        return self.head((weights @ v).mean(1))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_zero_gradient_bias_keeps_layer_rule(dtype):
    """A bias whose gradient is rounding noise is checked against its module's scale, not its own."""
    from stabcheck.analyzers.base import EstimatorSettings
    from stabcheck.api import analyze

    torch.manual_seed(0)
    model = KeyQueryAttention()
    generator = torch.Generator().manual_seed(0)
    data = (torch.randn(40, 5, 4, generator=generator), torch.randint(0, 3, (40,), generator=generator))
    fast = analyze(model, data, analyzers=["gradient-coherence"], dtype=dtype)
    loop = analyze(model, data, analyzers=["gradient-coherence"], dtype=dtype, estimator=EstimatorSettings(per_example_method="loop"))
    notes = fast.results[0]["analyzers"]["gradient-coherence"]["notes"]
    assert not [note for note in notes if "instead" in note]
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    for name in ("alpha", "m_coherence", "gsnr"):
        assert fast.metrics("gradient-coherence")[name] == pytest.approx(loop.metrics("gradient-coherence")[name], rel=tolerance)
