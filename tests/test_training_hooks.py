"""TrainingMonitor and the Lightning callback on short real training runs on scikit-learn's digits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from stabcheck.analyzers.base import EstimatorSettings
from stabcheck.api import analyze
from stabcheck.errors import UsageError
from stabcheck.training import TrainingMonitor

LR = 0.05
MOMENTUM = 0.9
WEIGHT_DECAY = 1e-4
BATCH = 64
ANALYSIS_SAMPLES = 256


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    bunch = sklearn_datasets.load_digits()
    inputs = torch.tensor(bunch.data / 16.0, dtype=torch.float32)
    targets = torch.tensor(bunch.target, dtype=torch.long)
    return inputs, targets


def make_mlp(seed: int) -> nn.Module:
    """A 64-8-10 MLP with BatchNorm (buffers) and dropout (draws from the global generator)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 10))


def make_monitor(digits, every_n_steps: int, **options) -> TrainingMonitor:
    inputs, targets = digits
    arguments = {"analyzers": ["sharpness", "softmax-collapse"], "dtype": "float64", **options}
    return TrainingMonitor((inputs[:ANALYSIS_SAMPLES], targets[:ANALYSIS_SAMPLES]), every_n_steps=every_n_steps, **arguments)


def train_by_hand(digits, steps: int, monitor: TrainingMonitor | None = None, saved: dict | None = None) -> nn.Module:
    """Mini-batch SGD with momentum and coupled weight decay, shuffled by the global generator.

    ``saved`` collects a copy of the weights and optimizer state at every step the monitor analyzes.
    """
    inputs, targets = digits
    model = make_mlp(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    model.train()
    step = 0
    if monitor is not None:
        _monitor_step(monitor, model, step, optimizer, saved)
    while step < steps:
        order = torch.randperm(inputs.shape[0])
        for start in range(0, inputs.shape[0], BATCH):
            batch = order[start : start + BATCH]
            optimizer.zero_grad()
            F.cross_entropy(model(inputs[batch]), targets[batch]).backward()
            optimizer.step()
            step += 1
            if monitor is not None:
                _monitor_step(monitor, model, step, optimizer, saved)
            if step == steps:
                break
    return model


def _monitor_step(monitor, model, step, optimizer, saved) -> None:
    if monitor.step(model, step, optimizer=optimizer) is not None and saved is not None:
        saved[step] = {
            "state_dict": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "step": step,
        }


def lambda_max(report, index: int) -> float:
    return report.results[index]["analyzers"]["sharpness"]["metrics"]["lambda_max"]


class _TagCounter(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1


def parse_html(path: Path) -> dict[str, int]:
    parser = _TagCounter()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser.tags


# --- plain hook in a hand-written loop ---------------------------------------------------------


@pytest.fixture(scope="module")
def monitored_run(digits):
    monitor = make_monitor(digits, every_n_steps=50)
    saved: dict[int, dict] = {}
    model = train_by_hand(digits, steps=150, monitor=monitor, saved=saved)
    return monitor, saved, model


def test_monitor_snapshots_every_n_steps(monitored_run):
    monitor, saved, _ = monitored_run
    report = monitor.report

    assert monitor.steps == [0, 50, 100, 150]
    assert [entry["step"] for entry in report.checkpoints] == [0, 50, 100, 150]
    assert all(entry["format"] == "in-memory" for entry in report.checkpoints)
    assert all(entry["path"] is None for entry in report.checkpoints)
    assert [result["checkpoint"] for result in report.results] == [0, 1, 2, 3]
    assert sorted(saved) == [0, 50, 100, 150]


def test_monitor_sharpness_equals_checkpoint_analysis(monitored_run, digits, tmp_path):
    monitor, saved, _ = monitored_run
    inputs, targets = digits
    for index, step in enumerate(monitor.steps):
        path = tmp_path / f"step-{step}.pt"
        torch.save(saved[step], path)
        reference = analyze(
            make_mlp(seed=1),
            (inputs[:ANALYSIS_SAMPLES], targets[:ANALYSIS_SAMPLES]),
            checkpoints=[path],
            analyzers=["sharpness"],
            dtype="float64",
        )
        assert reference.checkpoints[0]["step"] == step
        assert lambda_max(monitor.report, index) == pytest.approx(lambda_max(reference, 0), rel=1e-10)


def dense_hessian(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """Full float64 Hessian of the mean cross-entropy plus (w/2)|theta|^2, in eval mode."""
    model = copy.deepcopy(model).double().eval()
    named = list(model.named_parameters())
    buffers = dict(model.named_buffers())
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def objective(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, p in named:
            params[name] = theta[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
        outputs = functional_call(model, {**params, **buffers}, (inputs.double(),))
        return F.cross_entropy(outputs, targets) + 0.5 * weight_decay * theta.pow(2).sum()

    return torch.autograd.functional.hessian(objective, flat, vectorize=True)


def test_monitor_sharpness_equals_dense_eigvalsh(monitored_run, digits):
    monitor, saved, _ = monitored_run
    inputs, targets = digits
    model = make_mlp(seed=1)
    model.load_state_dict(saved[150]["state_dict"])
    hessian = dense_hessian(model, inputs[:ANALYSIS_SAMPLES], targets[:ANALYSIS_SAMPLES], WEIGHT_DECAY)
    eigenvalues = torch.linalg.eigvalsh(hessian)

    assert hessian.shape == (626, 626)
    assert lambda_max(monitor.report, 3) == pytest.approx(float(eigenvalues[-1]), rel=1e-9)
    assert lambda_max(monitor.report, 3) > 1.0


def test_monitor_reads_optimizer_settings(monitored_run):
    monitor, _, _ = monitored_run
    training = monitor.report.training
    sharpness = monitor.report.results[1]["analyzers"]["sharpness"]

    assert training["optimizer"] == "momentum"
    assert training["lr"] == LR
    assert training["momentum"] == MOMENTUM
    assert training["weight_decay"] == WEIGHT_DECAY
    assert training["source"] == "optimizer"
    assert sharpness["metrics"]["threshold"] == pytest.approx(2 * (1 + MOMENTUM) / LR)
    assert sharpness["metrics"]["edge_ratio"] == pytest.approx(sharpness["metrics"]["lambda_max"] * LR / (2 * (1 + MOMENTUM)))


def test_monitored_run_ends_with_identical_weights(monitored_run, digits):
    _, _, monitored = monitored_run
    unmonitored = train_by_hand(digits, steps=150)

    for name, tensor in unmonitored.state_dict().items():
        assert torch.equal(monitored.state_dict()[name], tensor), name


def test_monitor_step_leaves_training_state_unchanged(digits):
    inputs, targets = digits
    model = make_mlp(seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[:BATCH]), targets[:BATCH]).backward()
        optimizer.step()
    model.train()
    model[3].eval()  # one submodule in eval mode, to check that each flag is restored
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    gradients = {name: p.grad.clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    flags = [module.training for module in model.modules()]
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    rng_state = torch.get_rng_state()

    monitor = make_monitor(digits, every_n_steps=3, analyzers=["sharpness", "softmax-collapse", "gradient-coherence"])
    snapshot = monitor.step(model, 3, optimizer=optimizer)

    assert snapshot is not None
    assert snapshot.results[0]["analyzers"]["sharpness"]["status"] == "ok"
    for name, p in model.named_parameters():
        assert torch.equal(p, parameters[name]), name
        assert torch.equal(p.grad, gradients[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, buffers[name]), name
    assert [module.training for module in model.modules()] == flags
    assert all(not module._forward_hooks and not module._forward_pre_hooks for module in model.modules())
    after = optimizer.state_dict()
    assert after["param_groups"] == optimizer_state["param_groups"]
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    assert torch.equal(torch.get_rng_state(), rng_state)


def test_monitor_writes_parseable_reports(monitored_run, tmp_path):
    monitor, _, _ = monitored_run
    paths = {kind: tmp_path / f"report.{suffix}" for kind, suffix in
             [("json", "json"), ("html", "html"), ("junit", "xml"), ("markdown", "md"), ("csv", "csv")]}

    monitor.write(**paths)

    document = json.loads(paths["json"].read_text())
    assert [entry["step"] for entry in document["checkpoints"]] == [0, 50, 100, 150]
    assert document["exit_code"] == monitor.report.exit_code
    assert document["results"][3]["analyzers"]["sharpness"]["metrics"]["lambda_max"] == lambda_max(monitor.report, 3)
    assert parse_html(paths["html"])["html"] == 1
    assert len(paths["csv"].read_text().strip().splitlines()) == 5
    cases = ElementTree.parse(paths["junit"]).getroot().findall(".//testcase")
    edge_cases = [case.get("name") for case in cases if case.get("classname") == "sharpness.edge_ratio"]
    assert edge_cases == [f"in-memory model (step {step})" for step in (0, 50, 100, 150)]
    assert "in-memory model (step 150)" in paths["markdown"].read_text()
    hashes = [entry["sha256"] for entry in document["checkpoints"]]
    assert len(set(hashes)) == 4
    assert all(len(value) == 64 for value in hashes)


def test_monitor_gates_cover_the_whole_trajectory(monitored_run):
    monitor, _, _ = monitored_run
    edge_gates = [gate for gate in monitor.report.gates if gate["name"] == "sharpness.edge_ratio"]

    assert [gate["checkpoint"] for gate in edge_gates] == [0, 1, 2, 3]


def test_monitor_state_round_trip(monitored_run, digits):
    monitor, _, _ = monitored_run
    restored = make_monitor(digits, every_n_steps=50)

    restored.load_state_dict(monitor.state_dict())

    assert restored.steps == [0, 50, 100, 150]
    assert restored.report.to_json() == monitor.report.to_json()


def test_monitor_skips_steps_between_snapshots(digits):
    model = make_mlp(seed=0)
    monitor = make_monitor(digits, every_n_steps=10)

    assert monitor.report is None
    assert monitor.step(model, 7) is None
    assert monitor.step(model, 10) is not None
    assert monitor.step(model, 10) is None
    assert monitor.steps == [10]
    with pytest.raises(UsageError, match="not after the last analyzed step 10"):
        monitor.snapshot(model, 5)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"analyzers": ["sharpnes"]}, "unknown analyzer 'sharpnes'"),
        ({"analyzers": ["lmc"]}, "needs a second checkpoint"),
        ({"every_n_steps": 0}, "every_n_steps must be a positive integer"),
        ({"gates": {"sharpness.edge_ratio": {"warn": 2.0, "fail": 1.0}}}, "warn 2 is above fail 1"),
        ({"lr": -1.0}, "--lr must be a positive number"),
        ({"dtype": "float16"}, "float16"),
        ({"loss": "hinge"}, "'hinge' is not a built-in loss"),
    ],
)
def test_monitor_rejects_bad_options_at_construction(digits, options, message):
    from stabcheck.errors import StabcheckError

    inputs, targets = digits
    arguments = {"analyzers": ["sharpness"], "every_n_steps": 5, **options}
    with pytest.raises(StabcheckError, match=message):
        TrainingMonitor((inputs[:32], targets[:32]), **arguments)


def test_monitor_rejects_empty_data_at_construction(digits):
    from stabcheck.errors import DataError

    inputs, targets = digits
    with pytest.raises(DataError, match="no examples"):
        TrainingMonitor((inputs[:0], targets[:0]), every_n_steps=5)


def test_monitor_write_before_first_snapshot(digits, tmp_path):
    monitor = make_monitor(digits, every_n_steps=5)

    with pytest.raises(UsageError, match="no snapshot has been analyzed yet"):
        monitor.write(json=tmp_path / "report.json")
    assert not (tmp_path / "report.json").exists()


class CountingDataset(torch.utils.data.TensorDataset):
    """A TensorDataset that counts how many examples were read."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_monitor_reads_dataloader_once(digits):
    inputs, targets = digits
    dataset = CountingDataset(inputs, targets)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, shuffle=True)
    estimator = EstimatorSettings(trace_probes=6, density_probes=1, density_steps=8)
    monitor = TrainingMonitor(loader, analyzers=["hessian-trace"], every_n_steps=1, max_samples=128, estimator=estimator)
    model = make_mlp(seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    monitor.step(model, 0, optimizer=optimizer)
    report = monitor.step(model, 1, optimizer=optimizer)

    assert dataset.reads == 128
    assert report.data["num_samples"] == 128
    assert report.data["source"] == "DataLoader (dataset read by index, sampler ignored)"
    assert report.training["lr"] == 0.1
    trace = report.results[0]["analyzers"]["hessian-trace"]
    assert trace["diagnostics"]["batch_size"] == 32
    assert trace["diagnostics"]["batch_size_source"] == "data loader"
    metrics = trace["metrics"]
    assert metrics["frobenius_ratio"] == pytest.approx(metrics["frobenius_norm"] / (32**0.5 / 0.1))


class DigitsStream(torch.utils.data.IterableDataset):
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __iter__(self):
        return zip(self.inputs, self.targets)


def test_monitor_iterable_data_keeps_rng(digits):
    inputs, targets = digits
    loader = torch.utils.data.DataLoader(DigitsStream(inputs, targets), batch_size=50)
    rng_state = torch.get_rng_state()

    monitor = TrainingMonitor(loader, analyzers=["softmax-collapse"], every_n_steps=1, max_samples=120)
    report = monitor.step(make_mlp(seed=0), 0)

    assert torch.equal(torch.get_rng_state(), rng_state)
    assert report.data["num_samples"] == 120
    assert report.data["source"] == "DataLoader over an IterableDataset (iteration order)"


# --- import behaviour --------------------------------------------------------------------------


def test_import_stabcheck_does_not_import_torch():
    code = "import sys, stabcheck; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert output.split() == ["False"]


def test_stabcheck_exposes_training_hooks():
    import stabcheck

    assert stabcheck.TrainingMonitor is TrainingMonitor
    assert "TrainingMonitor" in stabcheck.__all__
    assert "StabcheckCallback" in stabcheck.__all__


def test_lightning_missing_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['lightning'] = None\n"
        "sys.modules['pytorch_lightning'] = None\n"
        "import stabcheck\n"
        "try:\n"
        "    stabcheck.StabcheckCallback\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout

    assert 'pip install "stabcheck[lightning]"' in output


# --- Lightning callback ------------------------------------------------------------------------


def _lightning():
    try:
        import lightning.pytorch as pl
    except ImportError:
        pl = pytest.importorskip("pytorch_lightning")
    return pl


LIGHTNING_LR = 0.1


def make_lightning_module(pl):
    class DigitsClassifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.network = make_mlp(seed=0)

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.network(inputs)

        def training_step(self, batch, batch_idx):
            inputs, targets = batch
            return F.cross_entropy(self(inputs), targets)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=LIGHTNING_LR)

    return DigitsClassifier()


def fit_lightning(pl, digits, max_steps: int, callbacks: list, ckpt_path: Path | None = None, module=None):
    inputs, targets = digits
    module = module or make_lightning_module(pl)
    torch.manual_seed(1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, targets), batch_size=BATCH, shuffle=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer, module


def make_recorder(pl, every_n_steps: int):
    """A callback that keeps a copy of the weights wherever the stabcheck callback analyzes."""

    class WeightRecorder(pl.Callback):
        def __init__(self) -> None:
            self.saved: dict[int, dict] = {}

        def on_train_start(self, trainer, pl_module) -> None:
            self._record(trainer, pl_module)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._record(trainer, pl_module)

        def _record(self, trainer, pl_module) -> None:
            if trainer.global_step % every_n_steps == 0:
                self.saved.setdefault(trainer.global_step, copy.deepcopy(pl_module.state_dict()))

    return WeightRecorder()


def make_callback(digits, tmp_path: Path, every_n_steps: int):
    from stabcheck.lightning import StabcheckCallback

    inputs, targets = digits
    return StabcheckCallback(
        (inputs[:ANALYSIS_SAMPLES], targets[:ANALYSIS_SAMPLES]),
        every_n_steps=every_n_steps,
        analyzers=["sharpness", "softmax-collapse"],
        json=tmp_path / "lightning.json",
        html=tmp_path / "lightning.html",
    )


@pytest.fixture(scope="module")
def lightning_run(digits, tmp_path_factory):
    pl = _lightning()
    tmp_path = tmp_path_factory.mktemp("lightning")
    callback = make_callback(digits, tmp_path, every_n_steps=20)
    recorder = make_recorder(pl, every_n_steps=20)
    _, module = fit_lightning(pl, digits, max_steps=60, callbacks=[callback, recorder])
    return pl, callback, recorder, module, tmp_path


def test_callback_snapshots_every_n_global_steps(lightning_run):
    _, callback, recorder, _, _ = lightning_run

    assert callback.monitor.steps == [0, 20, 40, 60]
    assert sorted(recorder.saved) == [0, 20, 40, 60]
    assert [result["checkpoint"] for result in callback.report.results] == [0, 1, 2, 3]


def test_callback_sharpness_matches_saved_weights(lightning_run, digits):
    pl, callback, recorder, _, _ = lightning_run
    inputs, targets = digits
    for index, step in enumerate(callback.monitor.steps):
        module = make_lightning_module(pl)
        module.load_state_dict(recorder.saved[step])
        reference = analyze(
            module,
            (inputs[:ANALYSIS_SAMPLES], targets[:ANALYSIS_SAMPLES]),
            analyzers=["sharpness"],
            lr=LIGHTNING_LR,
            optimizer="sgd",
        )
        assert lambda_max(callback.report, index) == pytest.approx(lambda_max(reference, 0), rel=1e-10)
    assert lambda_max(callback.report, 3) != lambda_max(callback.report, 0)


def test_callback_reads_lightning_optimizer(lightning_run):
    _, callback, _, _, _ = lightning_run
    training = callback.report.training

    assert training["optimizer"] == "sgd"
    assert training["lr"] == LIGHTNING_LR
    assert training["source"] == "optimizer"
    assert all(entry["training"]["lr"] == LIGHTNING_LR for entry in callback.report.checkpoints)
    threshold = callback.report.results[0]["analyzers"]["sharpness"]["metrics"]["threshold"]
    assert threshold == pytest.approx(2 / LIGHTNING_LR)


def test_callback_writes_reports_at_train_end(lightning_run):
    _, callback, _, _, tmp_path = lightning_run
    document = json.loads((tmp_path / "lightning.json").read_text())

    assert [entry["step"] for entry in document["checkpoints"]] == [0, 20, 40, 60]
    assert document["results"][2]["analyzers"]["sharpness"]["metrics"]["lambda_max"] == lambda_max(callback.report, 2)
    assert parse_html(tmp_path / "lightning.html")["html"] == 1


def test_callback_run_ends_with_identical_weights(lightning_run, digits):
    pl, _, _, monitored, _ = lightning_run
    _, unmonitored = fit_lightning(pl, digits, max_steps=60, callbacks=[])

    for name, tensor in unmonitored.state_dict().items():
        assert torch.equal(monitored.state_dict()[name], tensor), name


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_callback_resumed_run_continues_trajectory(digits, tmp_path):
    pl = _lightning()
    first = make_callback(digits, tmp_path, every_n_steps=20)
    trainer, _ = fit_lightning(pl, digits, max_steps=40, callbacks=[first])
    trainer.save_checkpoint(tmp_path / "step-40.ckpt")

    resumed = make_callback(digits, tmp_path, every_n_steps=20)
    fit_lightning(pl, digits, max_steps=60, callbacks=[resumed], ckpt_path=tmp_path / "step-40.ckpt")

    assert first.monitor.steps == [0, 20, 40]
    assert resumed.monitor.steps == [0, 20, 40, 60]
    assert resumed.report.results[1] == first.report.to_json()["results"][1]


def test_adam_step_zero_does_not_block_the_gate(digits):
    """Before Adam's first step edge_ratio is undefined, so that checkpoint is left out of its gate.

    Early Adam steps can be far past the threshold (tiny second moments), so only the absence of
    an inconclusive verdict is checked, not a pass.
    """
    inputs, targets = digits
    monitor = make_monitor(digits, every_n_steps=5, analyzers=["sharpness"])
    model = make_mlp(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor.step(model, 0, optimizer=optimizer)
    for step in range(1, 11):
        optimizer.zero_grad()
        F.cross_entropy(model(inputs[:64]), targets[:64]).backward()
        optimizer.step()
        monitor.step(model, step, optimizer=optimizer)

    first = monitor.report.results[0]["analyzers"]["sharpness"]
    assert first["status"] == "ok"
    assert first["metrics"]["edge_ratio"] is None
    assert first["metrics"]["lambda_max"] is not None
    assert any("no step yet" in note for note in first["notes"])
    edge_gates = [gate for gate in monitor.report.gates if gate["name"] == "sharpness.edge_ratio"]
    assert [gate["checkpoint"] for gate in edge_gates] == [1, 2]
    assert all(gate["status"] != "inconclusive" for gate in edge_gates)
    assert monitor.report.exit_code != 3
