"""Softmax collapse: the per-dtype criterion, margins and headroom, and the analyzer end to end."""

import math

import pytest
import torch
from torch import nn

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze
from stabcheck.engine.precision import DTYPES, collapse_margin, collapsed, softmax_denominator, top_two_margin


def logits_model(logits):
    """A model whose output for one-hot input i is exactly row i of ``logits``."""
    model = nn.Linear(logits.shape[0], logits.shape[1], bias=False).double()
    with torch.no_grad():
        model.weight.copy_(logits.T)
    return model, torch.eye(logits.shape[0], dtype=torch.float64)


def run(logits, labels, dtype="float64", **settings):
    model, inputs = logits_model(logits)
    report = analyze(model, (inputs, labels), analyzers=["softmax-collapse"], dtype=dtype, estimator=EstimatorSettings(**settings))
    return report.results[0]["analyzers"]["softmax-collapse"]


@pytest.mark.parametrize("name", list(DTYPES))
def test_margins_around_collapse_are_counted(name):
    dtype = DTYPES[name]
    limit = collapse_margin(dtype)
    margins = torch.tensor([limit - 0.2, limit - 0.05, limit + 0.05, limit + 0.2, limit + 3.0], dtype=torch.float64)
    logits = torch.stack([torch.full_like(margins, 3.0), 3.0 - margins], dim=1)
    assert collapsed(logits, dtype).tolist() == [False, False, True, True, True]


def test_collapse_margins_match_machine_epsilon():
    expected = {"bfloat16": 5.545, "float16": 7.625, "float32": 16.636, "float64": 36.737}
    for name, value in expected.items():
        assert collapse_margin(DTYPES[name]) == pytest.approx(value, abs=1e-3)


def test_equal_huge_logits_are_not_collapsed():
    logits = torch.tensor([[1e8, 1e8]])
    loss = nn.functional.cross_entropy(logits, torch.tensor([0]))
    assert float(loss) == pytest.approx(math.log(2), rel=1e-6)
    assert not bool(collapsed(logits, torch.float32)[0])
    assert float(top_two_margin(logits)[0]) == 0.0


def test_long_float16_row_does_not_stall():
    logits = torch.zeros(1, 4096, dtype=torch.float16)
    assert float(softmax_denominator(logits, torch.float16)[0]) == 4096.0
    probabilities = torch.softmax(logits, dim=1)
    assert float(probabilities[0, 0]) == 1 / 4096
    assert float(probabilities.float().sum()) == 1.0
    assert not bool(collapsed(logits, torch.float16)[0])


def test_log_softmax_of_far_logit_is_finite():
    values = torch.log_softmax(torch.tensor([[0.0, -200.0]]), dim=1)
    assert bool(torch.isfinite(values).all())
    assert float(values[0, 1]) == pytest.approx(-200.0)


@pytest.mark.parametrize("name", list(DTYPES))
def test_criterion_agrees_with_direct_computation(name):
    """Away from the rounding boundary, the criterion equals a zero loss and a one-hot softmax.

    Near the boundary the result depends on the order and precision of the summation, which
    differ between torch.sum and the softmax kernels, so rows whose non-maximal terms add up to
    between eps/8 and 2 eps are left out.
    """
    dtype = DTYPES[name]
    eps = torch.finfo(dtype).eps
    generator = torch.Generator().manual_seed(0)
    limit = collapse_margin(dtype)
    scale = torch.rand(4000, 1, generator=generator, dtype=torch.float64) * 2 * limit
    logits = torch.randn(4000, 5, generator=generator, dtype=torch.float64) * scale
    terms = torch.exp(logits - logits.max(dim=1, keepdim=True).values)
    terms[torch.arange(len(logits)), logits.argmax(dim=1)] = 0.0
    rest = terms.sum(dim=1)  # the non-maximal terms, without the rounding of 1 + rest
    clear = (rest < eps / 8) | (rest > 2 * eps)
    top = logits.argmax(dim=1)
    criterion = collapsed(logits, dtype)[clear]
    zero_loss = (nn.functional.cross_entropy(logits.to(dtype), top, reduction="none") == 0)[clear]
    one_hot = (torch.softmax(logits.to(dtype), dim=1).max(dim=1).values == 1)[clear]
    assert int(clear.sum()) > 3000
    assert 0 < int(criterion.sum()) < int(clear.sum())
    assert torch.equal(criterion, zero_loss)
    assert torch.equal(criterion, one_hot)


def test_analyzer_counts_and_headroom():
    margins = torch.tensor([2.0, 6.0, 10.0, 20.0, 40.0], dtype=torch.float64)
    logits = torch.stack([margins, torch.zeros_like(margins), torch.full_like(margins, -50.0)], dim=1)
    labels = torch.zeros(5, dtype=torch.long)
    result = run(logits, labels)
    metrics = result["metrics"]
    assert metrics["sc_fraction_by_dtype"] == {"float16": 0.6, "bfloat16": 0.8, "float32": 0.4, "float64": 0.2}
    assert metrics["sc_fraction"] == 0.4  # the loss dtype defaults to float32
    assert metrics["zero_loss_fraction"] == 0.4
    in_float64 = run(logits, labels, loss_dtype="float64")["metrics"]
    assert in_float64["sc_fraction"] == 0.2
    assert in_float64["zero_loss_fraction"] == 0.2
    assert metrics["logit_gap"]["quantiles"]["p50"] == 10.0
    headroom = metrics["headroom_by_dtype"]["float32"]
    assert headroom["min"] == pytest.approx(collapse_margin(torch.float32) - 40.0)
    assert headroom["median"] == pytest.approx(collapse_margin(torch.float32) - 10.0)
    assert headroom["share_past"] == 0.4
    assert any("Prieto et al." in note for note in result["notes"])


def test_nlm_alignment_matches_autograd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs = torch.randn(30, 4, dtype=torch.float64)
    labels = torch.randint(0, 3, (30,))
    report = analyze(model, (inputs, labels), analyzers=["softmax-collapse"], dtype="float64")
    nlm = report.results[0]["analyzers"]["softmax-collapse"]["metrics"]["nlm_alignment"]
    loss = nn.functional.cross_entropy(model(inputs), labels)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    gradient = torch.cat([g.reshape(-1) for g in grads])
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    expected = float(-(gradient @ weights) / (gradient.norm() * weights.norm()))
    assert nlm["overall"] == pytest.approx(expected, rel=1e-10)
    last = torch.cat([grads[2].reshape(-1), grads[3].reshape(-1)])
    last_weights = torch.cat([model[2].weight.detach().reshape(-1), model[2].bias.detach().reshape(-1)])
    by_block = {row["block"]: row["cosine"] for row in nlm["per_layer"]}
    assert by_block["2"] == pytest.approx(float(-(last @ last_weights) / (last.norm() * last_weights.norm())), rel=1e-10)


def test_mse_run_is_skipped_with_reason():
    model = nn.Linear(3, 2).double()
    targets = nn.functional.one_hot(torch.tensor([0, 1, 1, 0]), 2).double()
    report = analyze(model, (torch.randn(4, 3, dtype=torch.float64), targets), loss="mse", analyzers=["softmax-collapse"], dtype="float64")
    result = report.results[0]["analyzers"]["softmax-collapse"]
    assert result["status"] == "skipped"
    assert "mse" in result["notes"][0]


def test_grokking_fixture_shows_collapse_rising():
    """The modular-addition run trained without weight decay past 100% training accuracy."""
    from pathlib import Path

    from test_fixtures import load_module

    folder = Path(__file__).resolve().parent.parent / "fixtures" / "modular-addition"
    model = load_module(folder / "model.py").build_model()
    data = load_module(folder / "data.py").load_data()
    report = analyze(model, data, checkpoints=sorted(folder.glob("step-*.pt")), analyzers=["softmax-collapse"])
    steps = [entry["step"] for entry in report.checkpoints]
    fractions = [entry["analyzers"]["softmax-collapse"]["metrics"]["sc_fraction"] for entry in report.results]
    assert steps == sorted(steps)
    assert fractions[0] == 0.0
    assert fractions[-1] > 0.05
    assert all(later >= earlier for earlier, later in zip(fractions, fractions[1:]))
    # The fixture script counted the same fractions with its own code (fixtures/modular-addition/README.md).
    assert fractions[-1] == pytest.approx(190 / 420, abs=1e-12)
    last = report.results[-1]["analyzers"]["softmax-collapse"]
    assert last["metrics"]["sc_fraction_by_dtype"]["bfloat16"] == 1.0
    assert last["metrics"]["sc_fraction_by_dtype"]["float64"] == 0.0
    alignments = [entry["analyzers"]["softmax-collapse"]["metrics"]["nlm_alignment"]["overall"] for entry in report.results]
    assert max(alignments) > 0.4
    assert alignments[0] < max(alignments)
    medians = [entry["analyzers"]["softmax-collapse"]["metrics"]["headroom_by_dtype"]["float32"]["median"] for entry in report.results]
    assert all(later < earlier for earlier, later in zip(medians, medians[1:]))
    gates = [gate["status"] for gate in report.to_json()["gates"] if gate["name"] == "softmax-collapse.sc_fraction"]
    assert gates[-1] == "fail"
