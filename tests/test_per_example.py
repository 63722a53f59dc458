"""Per-example gradient sums against a loop of single-example backward passes."""

import pytest
import torch
from torch import nn

from cases import CASE_NAMES, make_case
from stabcheck.engine.memory import MemoryBudgetExceeded, parse_size
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.per_example import (
    CoupledExamplesError,
    estimate_memory,
    gradient_gram,
    gradient_sums,
    make_plan,
    per_example_gradients,
)

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-6}


def objective_for(case, dtype=torch.float64, **kwargs):
    return Objective(case.model, case.inputs, case.targets, builtin_loss(case.loss), dtype=dtype, **kwargs)


def classification_objective(model, input_shape, num_samples):
    """Seeded random inputs and 3-class targets for ``model``, as a float64 objective."""
    torch.manual_seed(0)
    model = model.double()
    inputs = torch.randn(num_samples, *input_shape, dtype=torch.float64)
    targets = torch.randint(0, 3, (num_samples,))
    return Objective(model, inputs, targets, builtin_loss("cross_entropy"), dtype=torch.float64), targets


def labels_of(case):
    return case.targets if case.targets.dim() == 1 else case.targets.argmax(1)


def loop_reference(objective):
    """Per-example gradients by one autograd.grad call per example, in float64 sums."""
    return per_example_gradients(objective, torch.arange(objective.num_samples), method="loop").double()


def relative(value, reference):
    return float((value - reference).abs().max() / reference.abs().max())


def assert_sums_match(sums, reference, labels, tolerance):
    assert relative(sums.sum_gradient, reference.sum(0)) <= tolerance
    assert relative(sums.sq_norms, reference.pow(2).sum(1)) <= tolerance
    assert relative(sums.sum_squares, reference.pow(2).sum(0)) <= tolerance
    for label in labels.unique().tolist():
        expected = float(reference[labels == label].sum(0).pow(2).sum())
        assert sums.group_sq_norm_of_sum[label] == pytest.approx(expected, rel=tolerance)


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_sums_match_loop_in_float64(name, method):
    case = make_case(name)
    objective = objective_for(case)
    sums = gradient_sums(objective, groups=labels_of(case), method=method)
    assert_sums_match(sums, loop_reference(objective), labels_of(case), TOLERANCE[torch.float64])


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "tied"])
def test_sums_match_loop_in_float32(name):
    case = make_case(name)
    objective = objective_for(case, dtype=torch.float32)
    sums = gradient_sums(objective, groups=labels_of(case))
    assert_sums_match(sums, loop_reference(objective), labels_of(case), TOLERANCE[torch.float32])


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "tied"])
def test_sum_equals_autograd_batch_gradient(name):
    case = make_case(name)
    objective = objective_for(case)
    params = {n: p.detach().requires_grad_(True) for n, p in objective.point.items()}
    total = objective.per_example_losses(params, objective.inputs, objective.targets).sum()
    batch = torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, list(params.values()))])
    sums = gradient_sums(objective)
    assert relative(sums.sum_gradient, batch) <= 1e-12


def test_layer_rule_covers_linear_and_conv():
    case = make_case("cnn_bn")
    sums = gradient_sums(objective_for(case))
    assert sums.methods["0.weight"] == "layer"
    assert sums.methods["4.weight"] == "layer"
    assert sums.methods["1.weight"] == "vmap"


def test_tied_weights_use_vmap_and_sum_both_uses():
    class TiedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(5, 5)
            self.decoder = nn.Linear(5, 5)
            self.decoder.weight = self.encoder.weight
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            return self.head(torch.tanh(self.decoder(torch.tanh(self.encoder(x)))))

    torch.manual_seed(0)
    objective, targets = classification_objective(TiedLinear(), (5,), 12)
    sums = gradient_sums(objective, groups=targets)
    assert sums.methods["encoder.weight"] == "vmap"
    assert sums.methods["head.weight"] == "layer"
    assert_sums_match(sums, loop_reference(objective), targets, 1e-10)


class SequenceModel(nn.Module):
    """Conv1d over a sequence, then a Linear on every position, then a mean over positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, kernel_size=3, padding=1, stride=1, dilation=2)
        self.proj = nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.conv(x)).transpose(1, 2)
        return self.proj(hidden).mean(dim=1)


def test_conv1d_and_sequence_linear_match_loop():
    torch.manual_seed(0)
    objective, targets = classification_objective(SequenceModel(), (2, 7), 10)
    sums = gradient_sums(objective, groups=targets)
    assert sums.methods["conv.weight"] == "layer"
    assert sums.methods["proj.weight"] == "layer"
    assert_sums_match(sums, loop_reference(objective), targets, 1e-10)


class ReusedLayer(nn.Module):
    """One Linear called twice, and a second Linear whose weight is also used outside it."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        hidden = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        return self.out(hidden) + hidden[:, :3] @ self.out.weight[:, :3].T


def test_reused_layers_fall_back_with_notes():
    torch.manual_seed(0)
    objective, targets = classification_objective(ReusedLayer(), (4,), 9)
    sums = gradient_sums(objective, groups=targets)
    assert sums.methods["shared.weight"] == "vmap"
    assert sums.methods["out.weight"] == "vmap"
    assert any("'shared' ran 2 times" in note for note in sums.notes)
    assert any("'out'" in note and "autograd" in note for note in sums.notes)
    assert_sums_match(sums, loop_reference(objective), targets, 1e-10)


def test_unused_module_has_zero_gradients():
    case = make_case("unused")
    sums = gradient_sums(objective_for(case))
    assert sums.methods["unused_head.weight"] == "unused"
    assert float(sums.block_sq_norms["unused_head"].abs().max()) == 0.0


@pytest.mark.parametrize("examples_per_chunk", [1, 3, 7])
def test_chunked_sums_equal_one_chunk(examples_per_chunk):
    case = make_case("cnn_bn")
    objective = objective_for(case)
    plan = make_plan(objective)
    per_example, fixed = estimate_memory(objective, plan)
    sums = gradient_sums(objective, groups=case.targets, memory_budget=fixed + examples_per_chunk * per_example)
    assert sums.chunk_size == examples_per_chunk
    assert sums.num_chunks >= objective.num_samples // examples_per_chunk
    assert_sums_match(sums, loop_reference(objective), case.targets, 1e-10)


def test_budget_below_one_example_raises():
    case = make_case("mlp")
    with pytest.raises(MemoryBudgetExceeded, match="--memory-budget"):
        gradient_sums(objective_for(case), memory_budget=1000)


def test_batchnorm_batch_statistics_are_rejected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    inputs = torch.randn(16, 4, dtype=torch.float64)
    targets = torch.randint(0, 3, (16,))
    objective = Objective(model, inputs, targets, builtin_loss("cross_entropy"), dtype=torch.float64, training=True)
    with pytest.raises(CoupledExamplesError, match="BatchNorm in train mode"):
        gradient_sums(objective)


def test_gram_matches_loop():
    case = make_case("cnn_bn")
    objective = objective_for(case)
    plan = make_plan(objective)
    gradient_sums(objective, plan=plan)
    indices = torch.tensor([3, 0, 7, 11, 5])
    reference = loop_reference(objective)[indices]
    gram = gradient_gram(objective, indices, plan)
    assert relative(gram, reference @ reference.T) <= 1e-10


@pytest.mark.parametrize(
    ("text", "expected"),
    [("8GB", 8 * 1000**3), ("512MiB", 512 * 1024**2), ("1.5 GiB", int(1.5 * 1024**3)), ("4096", 4096)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["8XB", "GB", "-1GB", "0"])
def test_parse_size_rejects_invalid(text):
    with pytest.raises(ValueError):
        parse_size(text)


class TiedLanguageModel(nn.Module):
    """Token embedding tied to the output layer, as in language models."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.output = nn.Linear(4, 7, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens):
        hidden = torch.tanh(self.mix(self.embedding(tokens))).mean(dim=1)
        return self.output(hidden)


def test_tied_embedding_and_output_match_loop():
    torch.manual_seed(0)
    model = TiedLanguageModel().double()
    tokens = torch.randint(0, 7, (11, 5))
    targets = torch.randint(0, 7, (11,))
    objective = Objective(model, tokens, targets, builtin_loss("cross_entropy"), dtype=torch.float64)
    sums = gradient_sums(objective, groups=targets)
    assert sums.methods["embedding.weight"] == "vmap"
    assert sums.methods["mix.weight"] == "layer"
    assert "output.weight" not in sums.methods
    assert_sums_match(sums, loop_reference(objective), targets, 1e-10)
