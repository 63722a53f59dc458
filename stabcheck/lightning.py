"""A PyTorch Lightning callback that runs :class:`~stabcheck.training.TrainingMonitor` during ``fit``.

It uses ``lightning.pytorch`` when the ``lightning`` package is installed and ``pytorch_lightning``
otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError(
            "stabcheck.lightning needs PyTorch Lightning, and neither lightning nor pytorch_lightning is "
            'installed. Install it with: pip install "stabcheck[lightning]"'
        ) from None

from stabcheck.errors import UsageError
from stabcheck.report.model import Report
from stabcheck.training import TrainingMonitor

# Under these strategies each rank has only a shard of the parameters, so the model seen by
# rank 0 is not the whole network.
# NOTE: the check in setup() has not run in the tests, because Lightning runs these strategies
# only on GPUs.
_SHARDED_STRATEGIES = (pl.strategies.FSDPStrategy, pl.strategies.DeepSpeedStrategy, pl.strategies.ModelParallelStrategy)


class StabcheckCallback(pl.Callback):
    """Analyze the LightningModule every ``every_n_steps`` global steps and write the trajectory at the end.

    ``data`` and the keyword arguments in ``monitor_options`` go to
    :class:`~stabcheck.training.TrainingMonitor`, which reads the data and checks every option
    when the callback is created. The analyzed objective is the loss of ``pl_module(inputs)``
    against the targets, so the module's ``forward`` must return what ``loss`` expects (logits
    for ``cross_entropy``). Snapshots are taken at the start of training and whenever
    ``trainer.global_step`` reaches a multiple of ``every_n_steps``, with the optimizer settings
    read from ``trainer.optimizers[0]``. At the end of training the report is written to each
    path given. Only the rank-0 process analyzes and writes. Under DDP every rank has the same
    weights, and the other ranks wait for rank 0 at their next synchronization. The callback's
    state (the snapshots so far) is saved in Lightning checkpoints, so a resumed run continues
    the trajectory.
    """

    def __init__(
        self,
        data: Any,
        *,
        every_n_steps: int,
        analyzers: str | list[str] | None = None,
        json: str | Path | None = None,
        html: str | Path | None = None,
        junit: str | Path | None = None,
        markdown: str | Path | None = None,
        csv: str | Path | None = None,
        **monitor_options: Any,
    ) -> None:
        super().__init__()
        self.monitor = TrainingMonitor(data, every_n_steps=every_n_steps, analyzers=analyzers, **monitor_options)
        self.outputs = {"json": json, "html": html, "junit": junit, "markdown": markdown, "csv": csv}

    @property
    def state_key(self) -> str:
        # Two instances in one Trainer need different keys in the checkpoint's callback states.
        return self._generate_state_key(
            every_n_steps=self.monitor.every_n_steps,
            analyzers=self.monitor.analyzers,
            outputs={kind: str(path) for kind, path in self.outputs.items() if path is not None},
        )

    @property
    def report(self) -> Report | None:
        """The trajectory report so far on rank 0; None on other ranks and before the first snapshot."""
        return self.monitor.report

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if isinstance(trainer.strategy, _SHARDED_STRATEGIES):
            raise UsageError(
                f"StabcheckCallback cannot analyze a model trained with {type(trainer.strategy).__name__}, "
                "because each rank has only a shard of the parameters. Use a single device or DDP, or "
                "save checkpoints and run stabcheck analyze on them."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._step(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        paths = {kind: path for kind, path in self.outputs.items() if path is not None}
        if trainer.is_global_zero and paths and self.monitor.report is not None:
            self.monitor.write(**paths)

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state_dict)

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # NOTE: the tests run one process, so this rank check has not run with DDP.
        if not trainer.is_global_zero:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self.monitor.step(pl_module, trainer.global_step, optimizer=optimizer)
