"""The fixed analysis set: the first ``max_samples`` examples, materialized once in a fixed order.

Every matrix-vector product of an analysis must see the same matrix, so data is read into
tensors up front. A DataLoader is read through its dataset by index (0, 1, 2, ...), which
ignores its sampler: a shuffled loader gives the same set on every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate

from stabcheck.engine.distributed import shard_bounds
from stabcheck.errors import DataError

READ_BATCH = 256


@dataclass(frozen=True)
class AnalysisSet:
    """Inputs and targets of the analysis, with class labels when the targets define them."""

    inputs: torch.Tensor
    targets: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None
    source: str
    loader_batch_size: int | None = None

    @property
    def num_samples(self) -> int:
        return int(self.inputs.shape[0])

    def shard(self, rank: int, world_size: int) -> AnalysisSet:
        """Return rank's contiguous share of the examples, as split by :func:`shard_bounds`.

        ``num_classes`` stays that of the whole set. Raises DataError when there are fewer
        examples than ranks, because a rank without examples has no shard to analyze.
        """
        if world_size == 1:
            return self
        if self.num_samples < world_size:
            raise DataError(
                f"the analysis set has {self.num_samples} example(s) for {world_size} processes; each "
                "process needs at least one. Raise --max-samples or start fewer processes."
            )
        start, stop = shard_bounds(self.num_samples, rank, world_size)
        labels = None if self.labels is None else self.labels[start:stop]
        return AnalysisSet(
            self.inputs[start:stop], self.targets[start:stop], labels, self.num_classes, self.source, self.loader_batch_size
        )


def materialize(data: Any, *, max_samples: int | None, spec: str = "data") -> AnalysisSet:
    """Turn what a data spec returned into an AnalysisSet of at most ``max_samples`` examples."""
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples must be at least 1, got {max_samples}.")

    if isinstance(data, AnalysisSet):
        # Already read and checked, as by a training monitor that reuses one set per snapshot.
        if max_samples is None or max_samples >= data.num_samples:
            return data
        labels = None if data.labels is None else data.labels[:max_samples]
        return AnalysisSet(
            data.inputs[:max_samples], data.targets[:max_samples], labels, data.num_classes, data.source, data.loader_batch_size
        )
    if isinstance(data, DataLoader):
        inputs, targets, source = _read_loader(data, max_samples, spec)
    elif isinstance(data, Dataset):
        inputs, targets, source = _read_dataset(data, default_collate, max_samples, spec)
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        inputs, targets = data
        if inputs.shape[0] != targets.shape[0]:
            raise DataError(
                f"data spec {spec!r} returned inputs with {inputs.shape[0]} rows but targets with "
                f"{targets.shape[0]}; both need one row per example."
            )
        if max_samples is not None:
            inputs, targets = inputs[:max_samples], targets[:max_samples]
        source = "tensors"
    else:
        raise DataError(
            f"data spec {spec!r} returned {_describe(data)}; expected a DataLoader, a Dataset, or a "
            "tuple (inputs, targets) of tensors."
        )

    if inputs.shape[0] == 0:
        raise DataError(f"data spec {spec!r} returned no examples. Check its arguments and files.")
    if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
        raise DataError(f"data spec {spec!r} returned inputs with NaN or inf values.")
    if targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
        raise DataError(f"data spec {spec!r} returned targets with NaN or inf values.")

    labels, num_classes = _class_labels(targets)
    batch_size = data.batch_size if isinstance(data, DataLoader) else None
    return AnalysisSet(inputs.contiguous(), targets.contiguous(), labels, num_classes, source, batch_size)


def _describe(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(item).__name__ for item in value[:4])
        return f"a {type(value).__name__} of {len(value)} items ({inner})"
    return f"a {type(value).__name__}"


def _read_loader(loader: DataLoader, max_samples: int | None, spec: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        batches, count = [], 0
        for batch in loader:
            batches.append(_split_batch(batch, spec))
            count += batches[-1][0].shape[0]
            if max_samples is not None and count >= max_samples:
                break
        inputs, targets = _concatenate(batches, spec)
        if max_samples is not None:
            inputs, targets = inputs[:max_samples], targets[:max_samples]
        return inputs, targets, "DataLoader over an IterableDataset (iteration order)"
    inputs, targets, _ = _read_dataset(dataset, loader.collate_fn or default_collate, max_samples, spec)
    return inputs, targets, "DataLoader (dataset read by index, sampler ignored)"


def _read_dataset(
    dataset: Dataset, collate: Any, max_samples: int | None, spec: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    if isinstance(dataset, IterableDataset):
        return _read_loader(DataLoader(dataset, batch_size=READ_BATCH), max_samples, spec)
    try:
        length = len(dataset)  # type: ignore[arg-type]
    except TypeError:
        raise DataError(f"data spec {spec!r} returned a Dataset without __len__; add one.") from None
    count = length if max_samples is None else min(length, max_samples)
    batches = []
    for start in range(0, count, READ_BATCH):
        items = [dataset[index] for index in range(start, min(start + READ_BATCH, count))]
        batches.append(_split_batch(collate(items), spec))
    if not batches:
        raise DataError(f"data spec {spec!r} returned an empty dataset.")
    inputs, targets = _concatenate(batches, spec)
    return inputs, targets, "Dataset (read by index)"


def _split_batch(batch: Any, spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, Sequence) and len(batch) >= 2:
        inputs, targets = batch[0], batch[1]
        if isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor):
            return inputs, targets
    raise DataError(
        f"data spec {spec!r} yields batches of {_describe(batch)}; expected (inputs, targets) tensor pairs."
    )


def _concatenate(batches: list[tuple[torch.Tensor, torch.Tensor]], spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not batches:
        raise DataError(f"data spec {spec!r} yielded no batches.")
    try:
        return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    except RuntimeError as error:
        raise DataError(f"data spec {spec!r} yields batches that cannot be stacked: {error}.") from None


def _class_labels(targets: torch.Tensor) -> tuple[torch.Tensor | None, int | None]:
    """Class labels from integer targets, or from one-hot float targets (one 1 per row)."""
    if not targets.is_floating_point() and targets.dim() == 1:
        labels = targets.long()
        return labels, int(labels.unique().numel())
    if targets.is_floating_point() and targets.dim() == 2:
        is_one_hot = bool(((targets == 0) | (targets == 1)).all()) and bool((targets.sum(dim=1) == 1).all())
        if is_one_hot:
            return targets.argmax(dim=1), int(targets.shape[1])
    return None, None
