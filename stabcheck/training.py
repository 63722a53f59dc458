"""Running the analyzers every N steps of a training loop and collecting one trajectory report.

:class:`TrainingMonitor` is the plain hook for a hand-written loop; the Lightning callback in
:mod:`stabcheck.lightning` drives the same class. Each snapshot calls :func:`stabcheck.api.analyze`
on the model's current weights, and the snapshots form a trajectory report, as several
checkpoints do on the command line.
"""

from __future__ import annotations

import copy
import json as json_module
import operator
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from stabcheck.analyzers.base import EstimatorSettings, ProgressFactory
from stabcheck.analyzers.registry import resolve_analyzers
from stabcheck.api import (
    analyze,
    check_lmc_request,
    judge,
    validate_model_mode,
    validate_settings,
)
from stabcheck.engine.objective import PerExampleLoss, builtin_loss
from stabcheck.errors import UsageError
from stabcheck.gates import parse_gates
from stabcheck.loading.checkpoint import load_checkpoint
from stabcheck.loading.data import materialize
from stabcheck.loading.optimizer import TrainingSettings, apply_overrides
from stabcheck.report.model import SCHEMA_VERSION, Report

class TrainingMonitor:
    """Analyze a model every ``every_n_steps`` optimizer steps and keep the snapshots as one report.

    Call :meth:`step` after each optimizer step with the number of steps taken so far (and once
    with 0 before training to include the initial weights). ``data`` is a DataLoader, a Dataset
    or an (inputs, targets) tuple. It is read once, here, into the fixed analysis set of its
    first ``max_samples`` examples, and every snapshot reuses that set. The other keyword
    arguments mean what they mean for :func:`stabcheck.analyze`, and ``analyzers=None`` runs
    every analyzer whose needs are met. Invalid analyzer ids, options, gates and data raise
    :class:`~stabcheck.errors.StabcheckError` here, before training starts.

    After each snapshot the whole trajectory is judged against ``gates`` (``strict`` counts
    warnings as failures). To compare with an earlier run, pass :attr:`report` to
    :func:`stabcheck.api.judge` with ``baseline``.

    A snapshot leaves training as it was. The model's parameters, buffers, ``.grad`` fields and
    train/eval flags stay the same, and so do the optimizer's state and the global torch random
    number generators (CPU, and the CUDA device the model is on). A monitored run therefore ends
    with the same weights as an unmonitored one.
    """

    def __init__(
        self,
        data: Any,
        *,
        every_n_steps: int,
        analyzers: str | Sequence[str] | None = None,
        loss: str | PerExampleLoss = "cross_entropy",
        max_samples: int | None = None,
        seed: int = 0,
        device: str | None = None,
        dtype: str = "float32",
        model_mode: str = "eval",
        estimator: EstimatorSettings | None = None,
        lr: float | None = None,
        optimizer: str | None = None,
        momentum: float | None = None,
        batch_size: int | None = None,
        weight_decay: float | None = None,
        lmc_with: str | Path | None = None,
        trust_checkpoint: bool = False,
        weight_set: str | None = None,
        gates: Mapping[str, Any] | None = None,
        strict: bool = False,
        progress: ProgressFactory | None = None,
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise UsageError(f"every_n_steps must be a positive integer, got {every_n_steps!r}.")
        self.every_n_steps = every_n_steps
        self.analyzers = _analyzer_ids(analyzers)
        self.estimator = estimator or EstimatorSettings()
        self.gates = gates
        self.strict = strict
        self._validate(
            loss=loss,
            device=device,
            dtype=dtype,
            model_mode=model_mode,
            lmc_with=lmc_with,
            trust_checkpoint=trust_checkpoint,
            weight_set=weight_set,
            overrides={"optimizer": optimizer, "lr": lr, "momentum": momentum, "batch_size": batch_size, "weight_decay": weight_decay},
        )

        # Reading a DataLoader over an IterableDataset draws a seed from the global generator,
        # so the analysis set is read with the generator state forked like every snapshot.
        with torch.random.fork_rng(devices=[]):
            self._analysis_set = materialize(data, max_samples=max_samples, spec=type(data).__name__)
        self._options: dict[str, Any] = {
            "analyzers": self.analyzers,
            "loss": loss,
            "lr": lr,
            "optimizer": optimizer,
            "momentum": momentum,
            "batch_size": batch_size,
            "weight_decay": weight_decay,
            "seed": seed,
            "dtype": dtype,
            "model_mode": model_mode,
            "estimator": self.estimator,
            "lmc_with": lmc_with,
            "trust_checkpoint": trust_checkpoint,
            "weight_set": weight_set,
            "progress": progress,
        }
        self._device = device
        self._data_spec = type(data).__name__
        self._snapshots: list[Report] = []
        self._report: Report | None = None

    @property
    def steps(self) -> list[int]:
        """Training steps of the snapshots taken so far, in order."""
        return [snapshot.checkpoints[0]["step"] for snapshot in self._snapshots]

    @property
    def report(self) -> Report | None:
        """The trajectory report over every snapshot, judged against the gates; None before the first."""
        return self._report

    def step(self, model: torch.nn.Module, step: int, *, optimizer: torch.optim.Optimizer | None = None) -> Report | None:
        """Analyze ``model`` when ``step`` is a multiple of ``every_n_steps``, else do nothing.

        ``step`` is the number of optimizer steps applied to the weights so far. A step equal to
        the last one analyzed is skipped, because a loop that accumulates gradients reports the
        same step for several batches. ``optimizer`` supplies the optimizer kind, learning rate,
        momentum, weight decay and Adam's second moments, as a checkpoint's optimizer state does.
        Returns the snapshot's own one-checkpoint report, or None when nothing was analyzed.
        """
        step = _check_step(step)
        if step % self.every_n_steps != 0:
            return None
        if self._snapshots and step == self.steps[-1]:
            return None
        return self.snapshot(model, step, optimizer=optimizer)

    def snapshot(self, model: torch.nn.Module, step: int, *, optimizer: torch.optim.Optimizer | None = None) -> Report:
        """Analyze ``model`` at ``step`` now, whatever ``every_n_steps`` is, and add it to the trajectory.

        Useful for the final weights of a run whose last step is not a multiple of ``every_n_steps``.
        Raises UsageError when ``step`` is not after the last snapshot's step, and the
        StabcheckError of an analysis that cannot run (such as a loss that does not fit the
        model's outputs). An analyzer that fails on its own is recorded with status ``error``.
        """
        step = _check_step(step)
        if self._snapshots and step <= self.steps[-1]:
            raise UsageError(
                f"step {step} is not after the last analyzed step {self.steps[-1]}, but the steps of a "
                "trajectory must increase. Use a new TrainingMonitor for a new run."
            )
        # A deep copy, because state_dict() returns the optimizer's live state tensors.
        optimizer_state = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        device = self._device or _model_device(model)
        rng_devices = [_cuda_index(device)] if device.startswith("cuda") else []

        with torch.random.fork_rng(devices=rng_devices), torch.enable_grad():
            snapshot = analyze(
                model,
                self._analysis_set,
                **self._options,
                device=device,
                step=step,
                optimizer_state=optimizer_state,
                provenance={"command": list(sys.argv), "data_spec": self._data_spec},
                gates=self.gates,
                strict=self.strict,
            )
        self._snapshots.append(snapshot)
        self._report = judge(_trajectory(self._snapshots), gates=self.gates, strict=self.strict)
        return snapshot

    def state_dict(self) -> dict[str, Any]:
        """Return the snapshots as JSON report documents, for a training checkpoint to carry.

        A run resumed from that checkpoint passes them to :meth:`load_state_dict` and its
        trajectory continues. The documents are the JSON report's, so NaN and inf become None.
        They contain only plain JSON types, so ``torch.load(..., weights_only=True)`` reads them.
        """
        from stabcheck.report.json import render_json

        # Rendering and parsing turns str subclasses such as torch.__version__ into plain str.
        return {"snapshots": [json_module.loads(render_json(snapshot)) for snapshot in self._snapshots]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the snapshots with those of :meth:`state_dict` and judge the trajectory again."""
        snapshots = []
        for document in state.get("snapshots", []):
            if document.get("schema_version") != SCHEMA_VERSION:
                raise UsageError(
                    f"a saved snapshot has report schema version {document.get('schema_version')!r}, but this "
                    f"version of stabcheck reads version {SCHEMA_VERSION}. Start a new trajectory."
                )
            snapshots.append(Report.from_json(document))
        self._snapshots = snapshots
        self._report = None
        if snapshots:
            self._report = judge(_trajectory(snapshots), gates=self.gates, strict=self.strict)

    def write(
        self,
        *,
        json: str | Path | None = None,
        html: str | Path | None = None,
        junit: str | Path | None = None,
        markdown: str | Path | None = None,
        csv: str | Path | None = None,
    ) -> None:
        """Write the trajectory report in each format given a path.

        Every format is rendered before any file is written, and each file is written to a
        temporary file and renamed, so a failure leaves no partial report. Raises UsageError
        before the first snapshot.
        """
        if self._report is None:
            raise UsageError("no snapshot has been analyzed yet, so there is no report to write. Call step() first.")
        self._report.write(json=json, html=html, junit=junit, markdown=markdown, csv=csv)

    def _validate(
        self,
        *,
        loss: str | PerExampleLoss,
        device: str | None,
        dtype: str,
        model_mode: str,
        lmc_with: str | Path | None,
        trust_checkpoint: bool,
        weight_set: str | None,
        overrides: Mapping[str, Any],
    ) -> None:
        """Run the checks that analyze would run at the first snapshot, so that errors come early."""
        chosen = resolve_analyzers(self.analyzers)
        validate_settings(self.estimator, device or "cpu", dtype)
        validate_model_mode(model_mode, list(self.analyzers or ()))
        check_lmc_request(chosen, list(self.analyzers or ()), lmc_with, False, 0)
        parse_gates(self.gates)
        if isinstance(loss, str):
            builtin_loss(loss)
        apply_overrides(TrainingSettings(), **overrides)
        if lmc_with is not None:
            load_checkpoint(Path(lmc_with), trust=trust_checkpoint, weight_set=weight_set)


def _analyzer_ids(analyzers: str | Sequence[str] | None) -> list[str] | None:
    """Accept one id, a comma-separated string of ids as on the command line, or a sequence."""
    if analyzers is None:
        return None
    if isinstance(analyzers, str):
        return [part.strip() for part in analyzers.split(",") if part.strip()]
    return list(analyzers)


def _check_step(step: int) -> int:
    try:
        value = operator.index(step)
    except TypeError:
        raise UsageError(f"step must be an integer (the number of optimizer steps so far), got {step!r}.") from None
    if value < 0:
        raise UsageError(f"step must be zero or positive, got {value}.")
    return value


def _model_device(model: torch.nn.Module) -> str:
    """Return the device of the model's first parameter as analyze expects it: cpu, cuda or cuda:N."""
    for parameter in model.parameters():
        device = parameter.device
        if device.type == "cuda":
            return "cuda" if device.index is None else f"cuda:{device.index}"
        return device.type
    return "cpu"


def _cuda_index(device: str) -> int:
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


def _trajectory(snapshots: list[Report]) -> Report:
    """Join one-checkpoint snapshot reports into a trajectory report, before judging.

    Provenance, model, data, estimator and training settings come from the first snapshot, as
    analyze takes them from the first checkpoint. Each checkpoint entry keeps its own training
    settings, so a learning-rate schedule shows in them.
    """
    first = snapshots[0]
    checkpoints = [snapshot.checkpoints[0] for snapshot in snapshots]
    results = [
        {**snapshot.results[0], "checkpoint": index} for index, snapshot in enumerate(snapshots)
    ]
    notes: list[str] = []
    for snapshot in snapshots:
        for note in snapshot.notes:
            if note not in notes:
                notes.append(note)
    return replace(first, checkpoints=checkpoints, results=results, notes=notes, gates=[], exit_code=0)
