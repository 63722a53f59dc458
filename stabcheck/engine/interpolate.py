r"""Linear interpolation between two sets of weights, BatchNorm statistics reset, and evaluation.

.. math::

    \theta(a) = \theta_A + a (\theta_B - \theta_A), \qquad a \in [0, 1]

for every floating-point tensor of the state (parameters and buffers). Integer buffers, such as
BatchNorm's ``num_batches_tracked``, are copied from A and never averaged. ``torch.lerp`` keeps
the result equal to A wherever A and B agree, and the ends use A and B themselves, so a = 0 and
a = 1 reproduce the endpoints bit for bit.

Split over several processes, each rank evaluates its shard and the loss and accuracy sums are
added over the ranks. The BatchNorm statistics are the same average over batches of the whole
analysis set as in one process: the ranks take turns over those batches and add up the
per-batch statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from stabcheck.engine.distributed import SINGLE_PROCESS, SingleProcess
from stabcheck.engine.objective import PerExampleLoss, module_mode

BATCHNORM_TYPES = (nn.modules.batchnorm._BatchNorm,)
# Examples per forward pass when re-estimating BatchNorm statistics and evaluating.
EVALUATION_BATCH = 256


class ArchitectureMismatch(ValueError):
    """The two states do not have the same keys, shapes or dtypes."""


@dataclass(frozen=True)
class PointValue:
    loss: float
    accuracy: float | None


def check_same_architecture(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor]) -> None:
    """Raise ArchitectureMismatch naming the first key or shape where the two states differ."""
    for key in state_a:
        if key not in state_b:
            raise ArchitectureMismatch(f"tensor {key!r} is in the first checkpoint but not in the second")
        if state_a[key].shape != state_b[key].shape:
            raise ArchitectureMismatch(
                f"tensor {key!r} has shape {tuple(state_a[key].shape)} in the first checkpoint and "
                f"{tuple(state_b[key].shape)} in the second"
            )
    for key in state_b:
        if key not in state_a:
            raise ArchitectureMismatch(f"tensor {key!r} is in the second checkpoint but not in the first")


def integer_entries(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Return the names of the tensors that interpolation copies from A instead of averaging."""
    return [key for key, value in state.items() if not value.is_floating_point()]


def interpolate_state(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    alpha: float,
    only: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Return theta(alpha) for the floating-point tensors (those in ``only``, when given).

    Every other tensor is A's.
    """
    chosen = set(state_a) if only is None else set(only)
    result = {}
    for key, value in state_a.items():
        if key not in chosen or not value.is_floating_point() or alpha == 0:
            result[key] = value.clone()
        elif alpha == 1:
            result[key] = state_b[key].clone()
        else:
            result[key] = torch.lerp(value, state_b[key], alpha)
    return result


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(module, BATCHNORM_TYPES) for module in model.modules())


def reestimate_batchnorm(model: nn.Module, inputs: torch.Tensor, group: SingleProcess = SINGLE_PROCESS) -> None:
    """Replace every BatchNorm layer's running statistics by those of ``inputs``, in place.

    The statistics are reset and then accumulated as a cumulative average (momentum None) over
    one pass in batches of EVALUATION_BATCH, with only the BatchNorm layers in train mode, so
    dropout stays off. With several processes, ``inputs`` is the whole analysis set on every
    rank (see :func:`_reestimate_over_ranks`).
    """
    if group.is_distributed:
        _reestimate_over_ranks(model, inputs, group)
        return
    layers = [module for module in model.modules() if isinstance(module, BATCHNORM_TYPES)]
    saved_momentum = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    try:
        with torch.no_grad(), module_mode(model, training=True, batchnorm_only=True):
            for start in range(0, inputs.shape[0], EVALUATION_BATCH):
                batch = inputs[start : start + EVALUATION_BATCH]
                if batch.shape[0] < 2 and start > 0:
                    break  # a last batch of one has no variance; the average already covers the rest
                model(batch)
    finally:
        for layer, momentum in zip(layers, saved_momentum):
            layer.momentum = momentum


def _reestimate_over_ranks(model: nn.Module, inputs: torch.Tensor, group: SingleProcess) -> None:
    """Set the BatchNorm statistics to the mean of the per-batch statistics, rank k taking the
    batches k, k + W, ... of the whole set, and add the sums and batch counts over the ranks.

    The batches are those of the single-process pass, with the same last-batch rule, so the
    result is the same average up to the order of the additions.
    """
    layers = [
        module
        for module in model.modules()
        if isinstance(module, BATCHNORM_TYPES) and module.running_mean is not None and module.running_var is not None
    ]
    sums = [(torch.zeros_like(layer.running_mean), torch.zeros_like(layer.running_var)) for layer in layers]
    starts = [
        start
        for start in range(0, inputs.shape[0], EVALUATION_BATCH)
        if start == 0 or inputs.shape[0] - start >= 2
    ]
    saved_momentum = [layer.momentum for layer in layers]
    for layer in layers:
        layer.momentum = None
    count = 0
    try:
        with torch.no_grad(), module_mode(model, training=True, batchnorm_only=True):
            for start in starts[group.rank :: group.world_size]:
                # After a reset, one batch with momentum None sets the statistics to that batch's.
                for layer in layers:
                    layer.reset_running_stats()
                model(inputs[start : start + EVALUATION_BATCH])
                for layer, (mean_sum, var_sum) in zip(layers, sums):
                    mean_sum += layer.running_mean
                    var_sum += layer.running_var
                count += 1
    finally:
        for layer, momentum in zip(layers, saved_momentum):
            layer.momentum = momentum
    count = group.sum_int(count)
    for layer, (mean_sum, var_sum) in zip(layers, sums):
        layer.running_mean.copy_(group.sum_(mean_sum) / count)
        layer.running_var.copy_(group.sum_(var_sum) / count)
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(count)


def evaluate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: PerExampleLoss,
    labels: torch.Tensor | None,
    group: SingleProcess = SINGLE_PROCESS,
) -> PointValue:
    """Return the mean per-example loss and the accuracy (when labels exist) in eval mode.

    With several processes, the means are over the examples of every rank.
    """
    total, correct = 0.0, 0
    with torch.no_grad(), module_mode(model, training=False):
        for start in range(0, inputs.shape[0], EVALUATION_BATCH):
            outputs = model(inputs[start : start + EVALUATION_BATCH])
            total += float(loss(outputs, targets[start : start + EVALUATION_BATCH]).double().sum())
            if labels is not None:
                predicted = outputs.reshape(outputs.shape[0], -1).argmax(dim=1)
                correct += int((predicted == labels[start : start + EVALUATION_BATCH]).sum())
    count = inputs.shape[0]
    if group.is_distributed:
        total, correct, count = group.sum_float(total), group.sum_int(correct), group.sum_int(count)
    return PointValue(total / count, None if labels is None else correct / count)


def working_copy(model: nn.Module, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Return a copy of ``model`` in ``dtype`` on ``device``, whose state the caller may overwrite."""
    work = copy.deepcopy(model)
    return work.to(device=device, dtype=dtype)
