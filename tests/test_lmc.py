"""The lmc analyzer: interpolation, BatchNorm reset, per-module barriers and weight matching."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from test_fixtures import load_module
from torch import nn

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze
from stabcheck.engine.alignment import (
    UnsupportedArchitecture,
    apply_permutations,
    permutation_spec,
    weight_matching,
)
from stabcheck.engine.interpolate import interpolate_state

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def classification_data(num_samples=64, features=6, classes=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, features, generator=generator, dtype=torch.float64)
    labels = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0.5).long()
    return inputs, labels.clamp(max=classes - 1)


def save(model, path):
    torch.save({"state_dict": model.state_dict()}, path)
    return path


def lmc(model, data, first, second, **settings):
    report = analyze(
        model,
        data,
        checkpoints=[first],
        lmc_with=second,
        analyzers=["lmc"],
        dtype="float64",
        estimator=EstimatorSettings(**settings),
    )
    return report.results[0]["analyzers"]["lmc"]


def mlp(seed, batchnorm=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def test_same_checkpoint_has_zero_barrier(tmp_path):
    model = mlp(0)
    path = save(model, tmp_path / "a.pt")
    result = lmc(model, classification_data(), path, path)
    losses = result["metrics"]["curve"]["loss"]
    assert result["metrics"]["barrier"] == 0.0
    assert result["metrics"]["accuracy_barrier"] == 0.0
    assert result["metrics"]["bn_reset"] is None
    assert any("no BatchNorm" in note for note in result["notes"])
    assert len(losses) == 25
    assert all(loss == losses[0] for loss in losses)


def test_endpoints_equal_the_checkpoints(tmp_path):
    inputs, labels = classification_data()
    first, second = mlp(0), mlp(1)
    result = lmc(first, (inputs, labels), save(first, tmp_path / "a.pt"), save(second, tmp_path / "b.pt"))
    curve = result["metrics"]["curve"]
    assert curve["alpha"][0] == 0.0
    assert curve["alpha"][-1] == 1.0
    with torch.no_grad():
        loss_a = float(nn.functional.cross_entropy(first.eval()(inputs), labels))
        loss_b = float(nn.functional.cross_entropy(second.eval()(inputs), labels))
    assert curve["loss"][0] == pytest.approx(loss_a, rel=1e-12)
    assert curve["loss"][-1] == pytest.approx(loss_b, rel=1e-12)
    assert result["diagnostics"]["endpoints"]["loss_a"] == curve["loss"][0]


def test_interpolation_ends_are_bit_exact():
    first, second = mlp(0).state_dict(), mlp(1).state_dict()
    for key in first:
        assert torch.equal(interpolate_state(first, second, 0.0)[key], first[key])
        assert torch.equal(interpolate_state(first, second, 1.0)[key], second[key])
    midpoint = interpolate_state(first, second, 0.5)
    assert torch.allclose(midpoint["0.weight"], (first["0.weight"] + second["0.weight"]) / 2, rtol=0, atol=1e-15)


def test_convex_model_has_no_barrier(tmp_path):
    torch.manual_seed(0)
    first, second = nn.Linear(6, 3).double(), nn.Linear(6, 3).double()
    with torch.no_grad():
        second.weight.mul_(4.0)
    result = lmc(first, classification_data(), save(first, tmp_path / "a.pt"), save(second, tmp_path / "b.pt"))
    losses = np.array(result["metrics"]["curve"]["loss"])
    alphas = np.array(result["metrics"]["curve"]["alpha"])
    chord = losses[0] + alphas * (losses[-1] - losses[0])
    assert result["metrics"]["barrier"] <= 1e-12
    assert np.all(losses <= chord + 1e-12)
    assert np.any(losses < chord - 1e-3)  # strictly convex in between, so the test can fail


def permuted_copy(model, seed=3):
    spec = permutation_spec(model)
    rng = np.random.default_rng(seed)
    permutations = [rng.permutation(size) for size in spec.sizes]
    twin = copy.deepcopy(model)
    twin.load_state_dict(apply_permutations(model.state_dict(), spec, permutations))
    return twin, spec, permutations


@pytest.mark.parametrize("batchnorm", [False, True])
def test_permuted_network_computes_same_function(batchnorm):
    model = mlp(0, batchnorm=batchnorm)
    if batchnorm:
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    twin, _, _ = permuted_copy(model)
    inputs, _ = classification_data()
    with torch.no_grad():
        assert torch.allclose(model.eval()(inputs), twin.eval()(inputs), rtol=0, atol=1e-6)
        assert not torch.equal(model.state_dict()["0.weight"], twin.state_dict()["0.weight"])


def test_weight_matching_recovers_permutation():
    model = mlp(0, batchnorm=True)
    twin, spec, _ = permuted_copy(model)
    found, _ = weight_matching(model.state_dict(), twin.state_dict(), spec)
    realigned = apply_permutations(twin.state_dict(), spec, found)
    for key, value in model.state_dict().items():
        assert torch.equal(realigned[key], value), key


def trained_mlp(seed, data, steps=300):
    """An MLP fitted to ``data``, so that its loss is well below that of a shrunken network."""
    model = mlp(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    inputs, labels = data
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), labels).backward()
        optimizer.step()
    return model


def test_alignment_removes_permutation_barrier(tmp_path):
    model = trained_mlp(0, classification_data())
    twin, _, _ = permuted_copy(model)
    result = lmc(model, classification_data(), save(model, tmp_path / "a.pt"), save(twin, tmp_path / "b.pt"), align="weight-matching")
    alignment = result["diagnostics"]["alignment"]
    assert result["metrics"]["barrier"] > 1e-3
    assert abs(alignment["barrier"]) <= 1e-12
    assert sum(layer["units_moved"] for layer in alignment["layers"]) > 0


def test_conv_chain_alignment_with_flatten():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 5, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(5 * 3 * 3, 6), nn.ReLU(), nn.Linear(6, 3),
    ).double().eval()  # fmt: skip
    twin, spec, _ = permuted_copy(model)
    inputs = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(model(inputs), twin.eval()(inputs), rtol=0, atol=1e-6)
    found, _ = weight_matching(model.state_dict(), twin.state_dict(), spec)
    realigned = apply_permutations(twin.state_dict(), spec, found)
    assert all(torch.equal(realigned[key], value) for key, value in model.state_dict().items())


def test_unsupported_architecture_is_skipped_with_reason(tmp_path):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(x + torch.tanh(self.inner(x)))

    torch.manual_seed(0)
    first, second = Residual().double(), Residual().double()
    with pytest.raises(UnsupportedArchitecture, match="nn.Sequential"):
        permutation_spec(first)
    result = lmc(first, classification_data(), save(first, tmp_path / "a.pt"), save(second, tmp_path / "b.pt"), align="weight-matching")
    assert "nn.Sequential" in result["diagnostics"]["alignment"]["skipped"]
    assert any(note.startswith("alignment skipped") for note in result["notes"])


def test_batchnorm_reset_changes_midpoint(tmp_path):
    first, second = mlp(0, batchnorm=True), mlp(1, batchnorm=True)
    for model, shift in ((first, 1.0), (second, -1.0)):
        model[1].running_mean.fill_(shift)
        model[1].running_var.fill_(3.0)
        model[1].num_batches_tracked.fill_(11)
    paths = save(first, tmp_path / "a.pt"), save(second, tmp_path / "b.pt")
    data = classification_data()
    reset = lmc(first, data, *paths)
    raw = lmc(first, data, *paths, bn_reset=False)
    middle = len(reset["metrics"]["curve"]["loss"]) // 2
    assert reset["metrics"]["bn_reset"] is True
    assert raw["metrics"]["bn_reset"] is False
    assert reset["metrics"]["curve"]["loss"][middle] != pytest.approx(raw["metrics"]["curve"]["loss"][middle], rel=1e-3)
    assert reset["metrics"]["curve"]["loss"][0] == raw["metrics"]["curve"]["loss"][0]
    assert any("--no-bn-reset" in note for note in raw["notes"])
    assert any("re-estimated" in note for note in reset["notes"])
    assert reset["diagnostics"]["integer_buffers_copied"] == ["1.num_batches_tracked"]


def test_per_module_barriers_locate_the_difference(tmp_path):
    first = mlp(0)
    second = copy.deepcopy(first)
    with torch.no_grad():
        second[2].weight.neg_()
    result = lmc(first, classification_data(), save(first, tmp_path / "a.pt"), save(second, tmp_path / "b.pt"))
    barriers = {row["block"]: row["barrier"] for row in result["diagnostics"]["per_layer"]}
    assert barriers["0"] == 0.0
    assert barriers["4"] == 0.0
    assert barriers["2"] == pytest.approx(result["metrics"]["barrier"], rel=1e-12)


def fixture_lmc(folder, first, second, **settings):
    path = FIXTURES / folder
    model = load_module(path / "model.py").build_model()
    data = load_module(path / "data.py").load_data()
    return lmc(model, data, path / first, path / second, lmc_layers=False, **settings)


def test_fixture_barriers_match_independent_loop():
    """The fixture script computed these curves with its own loop in float64."""
    spawned = fixture_lmc("digits-lmc-spawned", "child-a.pt", "child-b.pt")
    independent = fixture_lmc("digits-lmc-independent", "init1.pt", "init2.pt", align="weight-matching")
    assert spawned["metrics"]["barrier"] < 0.05
    assert independent["metrics"]["barrier"] == pytest.approx(0.463734, abs=2e-6)
    assert independent["metrics"]["accuracy_barrier"] == pytest.approx(0.1263, abs=1e-4)
    assert independent["diagnostics"]["alignment"]["barrier"] < independent["metrics"]["barrier"] / 4


def test_fixture_batchnorm_reset_matches_loop():
    reset = fixture_lmc("digits-lmc-batchnorm", "init1.pt", "init2.pt")
    raw = fixture_lmc("digits-lmc-batchnorm", "init1.pt", "init2.pt", bn_reset=False)
    assert reset["metrics"]["curve"]["loss"][12] == pytest.approx(0.140696, abs=2e-6)
    assert raw["metrics"]["curve"]["loss"][12] == pytest.approx(0.628857, abs=2e-6)
    assert reset["metrics"]["barrier"] == pytest.approx(0.138746, abs=2e-6)
    assert raw["metrics"]["barrier"] == pytest.approx(0.626907, abs=2e-6)
