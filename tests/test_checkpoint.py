"""Checkpoint layouts, safety and strict matching."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from stabcheck.api import analyze
from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.errors import CheckpointError
from stabcheck.loading.checkpoint import load_checkpoint, match_weights
from stabcheck.loading.optimizer import apply_overrides, settings_from_optimizer_state


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def trained_state() -> tuple[dict[str, torch.Tensor], dict]:
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    inputs = torch.randn(40, 5, generator=torch.Generator().manual_seed(2))
    targets = torch.arange(40) % 3
    for _ in range(5):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model.state_dict(), optimizer.state_dict()


def data():
    generator = torch.Generator().manual_seed(4)
    return torch.randn(40, 5, generator=generator), torch.arange(40) % 3


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + key: value for key, value in state.items()}


# float64 so that the explicit Lanczos residuals can reach the tight tolerance.
ESTIMATOR = EstimatorSettings(lanczos_tol=1e-10, lanczos_max_iter=200)

LAYOUTS = {
    "plain": (lambda s, o: s, "state_dict", None),
    "state_dict_key": (lambda s, o: {"state_dict": s}, "dict[state_dict]", None),
    "model_key": (lambda s, o: {"model": s, "step": 3}, "dict[model]", None),
    "model_state_dict_key": (lambda s, o: {"model_state_dict": s, "optimizer_state_dict": o, "step": 5}, "dict[model_state_dict]", None),
    "lightning": (
        lambda s, o: {
            "state_dict": prefixed(s, "model."),
            "pytorch-lightning_version": "2.4.0",
            "global_step": 12,
            "epoch": 1,
            "optimizer_states": [o],
        },
        "lightning",
        "model.",
    ),
    "data_parallel": (lambda s, o: {"state_dict": prefixed(s, "module.")}, "dict[state_dict]", "module."),
    "compiled": (lambda s, o: prefixed(s, "_orig_mod."), "state_dict", "_orig_mod."),
    "ddp_compiled": (lambda s, o: prefixed(s, "module._orig_mod."), "state_dict", "module._orig_mod."),
}


@pytest.fixture(scope="module")
def reference():
    state, optimizer_state = trained_state()
    model = build_model()
    model.load_state_dict(state)
    report = analyze(model, data(), dtype="float64", estimator=ESTIMATOR, analyzers=["sharpness"])
    value = report.results[0]["analyzers"]["sharpness"]["metrics"]["lambda_max"]
    assert value is not None
    return state, optimizer_state, value


def lambda_max_from(path: Path, **options) -> tuple[float, object]:
    report = analyze(build_model(), data(), checkpoints=[path], dtype="float64", estimator=ESTIMATOR, **options)
    value = report.results[0]["analyzers"]["sharpness"]["metrics"]["lambda_max"]
    assert value is not None
    return value, report


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loads_identically(tmp_path, reference, layout):
    state, optimizer_state, expected_lambda = reference
    make, expected_format, expected_prefix = LAYOUTS[layout]
    path = tmp_path / f"{layout}.pt"
    torch.save(make(state, optimizer_state), path)

    checkpoint = load_checkpoint(path)
    matched = match_weights(checkpoint, build_model())
    assert checkpoint.format == expected_format
    assert matched.stripped_prefix == expected_prefix
    assert set(matched.state_dict) == set(state)
    for key, value in state.items():
        assert torch.equal(matched.state_dict[key], value), key

    value, report = lambda_max_from(path)
    assert value == expected_lambda
    entry = report.checkpoints[0]
    assert entry["format"] == expected_format
    assert entry["stripped_prefix"] == expected_prefix
    assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_safetensors_layout(tmp_path, reference):
    state, _, expected_lambda = reference
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"step": "42"})
    checkpoint = load_checkpoint(path)
    assert checkpoint.format == "safetensors"
    assert checkpoint.step == 42
    value, _ = lambda_max_from(path)
    assert value == expected_lambda


def test_weight_set_option_needs_several_sets(tmp_path, reference):
    state, _, _ = reference
    plain = tmp_path / "plain.pt"
    torch.save(state, plain)
    tensors = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tensors))
    for path in (plain, tensors):
        with pytest.raises(CheckpointError, match="--weight-set 'ema' does not apply"):
            load_checkpoint(path, weight_set="ema")


def test_lightning_reads_step_and_optimizer(tmp_path, reference):
    state, optimizer_state, _ = reference
    path = tmp_path / "run.ckpt"
    torch.save(LAYOUTS["lightning"][0](state, optimizer_state), path)
    checkpoint = load_checkpoint(path)
    assert checkpoint.step == 12
    settings = settings_from_optimizer_state(checkpoint.optimizer_state, dict(build_model().named_parameters()))
    assert settings.optimizer == "momentum"
    assert settings.lr == pytest.approx(0.3)
    assert settings.momentum == pytest.approx(0.9)


def test_ema_weight_set_is_chosen_by_option(tmp_path, reference):
    state, _, expected_lambda = reference
    ema = {key: value * 0.5 for key, value in state.items()}
    path = tmp_path / "ema.pt"
    torch.save({"model_state_dict": state, "ema_state_dict": ema}, path)

    default = load_checkpoint(path)
    assert default.weight_set == "model_state_dict"
    assert "ema_state_dict" in default.available_weight_sets
    assert any("ema_state_dict" in note for note in default.notes)

    chosen = load_checkpoint(path, weight_set="ema_state_dict")
    assert chosen.weight_set == "ema_state_dict"
    assert torch.equal(match_weights(chosen, build_model()).state_dict["0.weight"], ema["0.weight"])

    value, report = lambda_max_from(path, weight_set="ema_state_dict")
    assert report.checkpoints[0]["weight_set"] == "ema_state_dict"
    assert value != expected_lambda

    with pytest.raises(CheckpointError, match="weight set 'ema' not found.*ema_state_dict"):
        load_checkpoint(path, weight_set="ema")


def test_nested_ema_weight_set(tmp_path, reference):
    state, _, _ = reference
    path = tmp_path / "nested.pt"
    torch.save({"state_dict": state, "ema": {"state_dict": prefixed(state, "module."), "decay": 0.999}}, path)
    checkpoint = load_checkpoint(path, weight_set="ema.state_dict")
    matched = match_weights(checkpoint, build_model())
    assert matched.stripped_prefix == "module."


class FileCreatingPayload:
    """Unpickling this object opens (and so creates) a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_untrusted_pickle_does_not_run(tmp_path, reference):
    state, _, _ = reference
    marker = tmp_path / "marker-created"
    path = tmp_path / "payload.pt"
    torch.save({"state_dict": state, "extra": FileCreatingPayload(marker)}, path)
    with pytest.raises(CheckpointError) as raised:
        load_checkpoint(path)
    message = str(raised.value)
    assert "builtins.open" in message or "io.open" in message
    assert "--trust-checkpoint" in message
    assert not marker.exists()


def test_trusted_pickle_runs_only_with_flag(tmp_path, reference):
    state, _, _ = reference
    marker = tmp_path / "marker-created"
    path = tmp_path / "payload.pt"
    torch.save({"state_dict": state, "extra": FileCreatingPayload(marker)}, path)
    checkpoint = load_checkpoint(path, trust=True)
    assert marker.exists()
    assert set(checkpoint.weights) == set(state)


def test_truncated_file_names_the_file(tmp_path, reference):
    state, _, _ = reference
    path = tmp_path / "truncated.pt"
    torch.save({"state_dict": state}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"truncated\.pt is truncated or corrupt"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all" * 20])
def test_garbage_or_empty_file_is_rejected(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, reference):
    state, _, _ = reference
    changed = dict(state)
    del changed["2.bias"]
    changed["extra.weight"] = torch.zeros(2)
    path = tmp_path / "mismatch.pt"
    torch.save(changed, path)
    with pytest.raises(CheckpointError) as raised:
        match_weights(load_checkpoint(path), build_model())
    message = str(raised.value)
    assert "missing keys (in the model, not in the checkpoint): 2.bias" in message
    assert "unexpected keys (in the checkpoint, not in the model): extra.weight" in message


def test_shape_mismatch_is_listed(tmp_path, reference):
    state, _, _ = reference
    changed = dict(state)
    changed["2.weight"] = torch.zeros(3, 7)
    path = tmp_path / "shape.pt"
    torch.save(changed, path)
    with pytest.raises(CheckpointError, match=r"2\.weight \(3, 7\) vs model \(3, 6\)"):
        match_weights(load_checkpoint(path), build_model())


def test_non_finite_parameters_are_named(tmp_path, reference):
    state, _, _ = reference
    changed = {key: value.clone() for key, value in state.items()}
    changed["0.bias"][1] = float("nan")
    changed["2.weight"][0, 0] = float("inf")
    path = tmp_path / "nan.pt"
    torch.save(changed, path)
    with pytest.raises(CheckpointError, match=r"non-finite values .* 0\.bias, 2\.weight"):
        match_weights(load_checkpoint(path), build_model())


def test_checkpoint_file_is_unchanged(tmp_path, reference):
    state, optimizer_state, _ = reference
    path = tmp_path / "keep.pt"
    torch.save({"model_state_dict": state, "optimizer_state_dict": optimizer_state}, path)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    lambda_max_from(path)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def adam_state(kind: str, *, weight_decay: float = 0.0, named: bool = False):
    model = build_model()
    params = model.named_parameters() if named else model.parameters()
    optimizer_class = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
    optimizer = optimizer_class(params, lr=1e-3, betas=(0.8, 0.99), weight_decay=weight_decay)
    inputs, targets = data()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer.state_dict()


@pytest.mark.parametrize("named", [False, True])
def test_adam_state_maps_second_moments(named):
    model, state = adam_state("adam", weight_decay=0.01, named=named)
    settings = settings_from_optimizer_state(state, dict(model.named_parameters()))
    assert settings.optimizer == "adam"
    assert settings.betas == (0.8, 0.99)
    assert settings.optimizer_step == 3
    assert set(settings.exp_avg_sq) == {name for name, _ in model.named_parameters()}
    assert torch.equal(settings.exp_avg_sq["2.bias"], state["state"][3]["exp_avg_sq"])
    # Adam's weight_decay is coupled L2 and enters the objective.
    assert settings.weight_decay == {name: 0.01 for name, _ in model.named_parameters()}


def test_adamw_decay_is_decoupled():
    model, state = adam_state("adamw", weight_decay=0.05)
    settings = settings_from_optimizer_state(state, dict(model.named_parameters()))
    assert settings.optimizer == "adamw"
    assert settings.weight_decay == {}
    assert settings.decoupled_weight_decay == pytest.approx(0.05)


def test_sgd_weight_decay_and_nesterov():
    model = build_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, nesterov=True, weight_decay=1e-3)
    settings = settings_from_optimizer_state(optimizer.state_dict(), dict(model.named_parameters()))
    assert settings.optimizer == "momentum"
    assert settings.nesterov
    assert settings.weight_decay["0.weight"] == pytest.approx(1e-3)


def test_options_override_checkpoint_values():
    model, state = adam_state("adam")
    settings = settings_from_optimizer_state(state, dict(model.named_parameters()))
    overridden = apply_overrides(settings, lr=0.01)
    assert overridden.lr == 0.01
    assert overridden.source == "options"
    assert overridden.exp_avg_sq is not None
    assert settings.source == "checkpoint"


def test_out_of_order_state_unused():
    model = build_model()
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam(parameters[::-1], lr=1e-3)
    inputs, targets = data()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    settings = settings_from_optimizer_state(optimizer.state_dict(), dict(model.named_parameters()))
    assert settings.exp_avg_sq is None
    assert any("does not follow model order" in note for note in settings.notes)


def train_with_groups(named: bool):
    """Train with two SGD param groups: weights decayed by 0.01, biases not decayed."""
    model = build_model()
    weights = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [(n, p) for n, p in model.named_parameters() if n.endswith("bias")]
    pick = (lambda items: items) if named else (lambda items: [p for _, p in items])
    optimizer = torch.optim.SGD(
        [{"params": pick(weights), "weight_decay": 0.01}, {"params": pick(biases), "weight_decay": 0.0}], lr=0.1
    )
    inputs, targets = data()
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs), targets).backward()
        optimizer.step()
    return model, optimizer.state_dict()


def test_named_param_groups_map_weight_decay_exactly(tmp_path):
    from cases import dense_hessian

    model, optimizer_state = train_with_groups(named=True)
    path = tmp_path / "groups.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer_state}, path)
    settings = settings_from_optimizer_state(optimizer_state, dict(model.named_parameters()))
    assert settings.weight_decay == {"0.weight": 0.01, "2.weight": 0.01}

    value, _ = lambda_max_from(path)
    inputs, targets = data()
    reference_model = build_model().double()
    reference_model.load_state_dict(model.state_dict())
    dense = dense_hessian(reference_model, inputs.double(), targets, "cross_entropy", weight_decay=settings.weight_decay)
    assert value == pytest.approx(float(torch.linalg.eigvalsh(dense)[-1]), rel=1e-8)


def test_unnamed_param_groups_with_different_decay_are_rejected(tmp_path):
    model, optimizer_state = train_with_groups(named=False)
    path = tmp_path / "groups.pt"
    torch.save({"model_state_dict": model.state_dict(), "optimizer_state_dict": optimizer_state}, path)
    with pytest.raises(CheckpointError, match=r"weight decay \[0\.01, 0\.0\].*--weight-decay"):
        lambda_max_from(path)
    # An explicit coupled decay for every parameter lets the analysis run.
    _, report = lambda_max_from(path, weight_decay=0.01)
    assert report.checkpoints[0]["training"]["weight_decay"] == 0.01
    assert report.checkpoints[0]["training"]["overridden"] == ["weight_decay"]


def test_unnamed_equal_decay_applies_to_all():
    model = build_model()
    parameters = list(model.parameters())
    optimizer = torch.optim.SGD(
        [{"params": parameters[:2], "weight_decay": 0.02}, {"params": parameters[2:], "weight_decay": 0.02}], lr=0.1
    )
    settings = settings_from_optimizer_state(optimizer.state_dict(), dict(model.named_parameters()))
    assert settings.weight_decay == {name: 0.02 for name, _ in model.named_parameters()}


def test_unnamed_adam_groups_explain_missing_moments():
    model = build_model()
    parameters = list(model.parameters())
    optimizer = torch.optim.Adam([{"params": parameters[:2]}, {"params": parameters[2:]}], lr=1e-3)
    inputs, targets = data()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), targets).backward()
    optimizer.step()
    settings = settings_from_optimizer_state(optimizer.state_dict(), dict(model.named_parameters()))
    assert settings.exp_avg_sq is None
    assert any("2 param groups" in note and "named_parameters" in note for note in settings.notes)
