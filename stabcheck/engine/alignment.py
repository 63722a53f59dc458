r"""Permutation alignment of hidden units by weight matching.

Permuting the hidden units of a layer, together with the matching rows and columns of its
neighbours, leaves the network's function unchanged. Weight matching (Ainsworth, Hayase &
Srinivasa 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries") picks, for every
hidden layer l, the permutation P_l of B's units that maximizes

.. math::

    \sum_l \langle W_l^A, P_l W_l^B P_{l-1}^\top \rangle + \langle b_l^A, P_l b_l^B \rangle

(plus the BatchNorm parameters and statistics of that layer), by coordinate descent: each P_l in
turn is the solution of a linear assignment problem with the others fixed, until no P_l changes.

Supported are ``nn.Sequential`` chains of Linear, Conv1d and Conv2d (groups 1), BatchNorm, pooling,
Flatten and elementwise layers (activations, dropout). Anything else raises
:class:`UnsupportedArchitecture` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

ELEMENTWISE_TYPES = (
    nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Mish,
    nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
)  # fmt: skip
WEIGHTED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)
MAX_SWEEPS = 100


class UnsupportedArchitecture(ValueError):
    """The model is not a chain whose hidden units weight matching can permute."""


@dataclass(frozen=True)
class Axis:
    """One axis of one state tensor that a hidden layer's permutation reorders.

    ``repeat`` is the number of consecutive entries per unit along the axis. For a Linear layer
    after Flatten, each channel of the previous convolution becomes ``repeat`` input features.
    """

    key: str
    axis: int
    repeat: int = 1


@dataclass
class PermutationSpec:
    """The hidden layers of a chain and the tensor axes that each one's permutation reorders."""

    sizes: list[int] = field(default_factory=list)
    axes: list[list[Axis]] = field(default_factory=list)
    layer_names: list[str] = field(default_factory=list)


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """Describe how the hidden units of a Sequential chain can be permuted."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedArchitecture(
            f"weight matching supports nn.Sequential chains, and the model's class is {type(model).__name__}"
        )
    spec = PermutationSpec()
    # The hidden layer whose units the next weighted layer's inputs are, and its repeat count.
    open_group: int | None = None
    repeat = 1

    for name, module in _flatten_sequential(model):
        prefix = f"{name}." if name else ""
        if isinstance(module, WEIGHTED_TYPES):
            if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
                raise UnsupportedArchitecture(f"weight matching does not support grouped convolution {name!r}")
            if open_group is not None:
                spec.axes[open_group].append(Axis(f"{prefix}weight", 1, repeat))
            repeat = 1
            spec.sizes.append(module.weight.shape[0])
            spec.layer_names.append(name)
            spec.axes.append([Axis(f"{prefix}weight", 0)])
            if module.bias is not None:
                spec.axes[-1].append(Axis(f"{prefix}bias", 0))
            open_group = len(spec.sizes) - 1
        elif isinstance(module, BATCHNORM_TYPES):
            if open_group is None:
                raise UnsupportedArchitecture(f"BatchNorm layer {name!r} comes before any Linear or Conv layer")
            for key in ("weight", "bias", "running_mean", "running_var"):
                if getattr(module, key, None) is not None:
                    spec.axes[open_group].append(Axis(f"{prefix}{key}", 0))
        elif isinstance(module, nn.Flatten):
            repeat = 0  # set from the next Linear layer's input size
        elif isinstance(module, ELEMENTWISE_TYPES):
            continue
        else:
            raise UnsupportedArchitecture(
                f"weight matching cannot permute through module {name!r} of type {type(module).__name__}; "
                "it supports Linear, Conv1d, Conv2d, BatchNorm, pooling, Flatten and elementwise layers"
            )

    if not spec.sizes:
        raise UnsupportedArchitecture("the model has no Linear or Conv layer to align")
    # The last layer's outputs are the network's outputs, which must keep their order.
    spec.sizes.pop()
    spec.axes.pop()
    spec.layer_names.pop()
    _resolve_flatten(model, spec)
    return spec


def _flatten_sequential(model: nn.Sequential, prefix: str = "") -> list[tuple[str, nn.Module]]:
    result = []
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            result.extend(_flatten_sequential(child, f"{full}."))
        else:
            result.append((full, child))
    return result


def _resolve_flatten(model: nn.Module, spec: PermutationSpec) -> None:
    """Replace the placeholder repeat 0 (a Linear after Flatten) by the features per channel."""
    state = model.state_dict()
    for group, axes in enumerate(spec.axes):
        for index, axis in enumerate(axes):
            if axis.repeat == 0:
                in_features = state[axis.key].shape[1]
                if in_features % spec.sizes[group]:
                    raise UnsupportedArchitecture(
                        f"{axis.key!r} has {in_features} input features, not a multiple of the "
                        f"{spec.sizes[group]} channels before Flatten"
                    )
                axes[index] = Axis(axis.key, axis.axis, in_features // spec.sizes[group])


def apply_permutations(
    state: Mapping[str, torch.Tensor], spec: PermutationSpec, permutations: list[np.ndarray]
) -> dict[str, torch.Tensor]:
    """Return the state with hidden layer l's units reordered by ``permutations[l]``."""
    result = {key: value.clone() for key, value in state.items()}
    for group, axes in enumerate(spec.axes):
        order = torch.as_tensor(permutations[group], dtype=torch.long)
        for axis in axes:
            result[axis.key] = result[axis.key].index_select(axis.axis, _expand(order, axis.repeat).to(result[axis.key].device))
    return result


def _expand(order: torch.Tensor, repeat: int) -> torch.Tensor:
    if repeat == 1:
        return order
    return (order.unsqueeze(1) * repeat + torch.arange(repeat)).reshape(-1)


def weight_matching(
    state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor], spec: PermutationSpec, seed: int = 0
) -> tuple[list[np.ndarray], int]:
    """Find permutations of B's hidden units that match A's weights; return them and the sweeps used."""
    permutations = [np.arange(size) for size in spec.sizes]
    generator = np.random.default_rng(seed)
    for sweep in range(1, MAX_SWEEPS + 1):
        changed = False
        for group in generator.permutation(len(spec.sizes)):
            cost = _cost_matrix(state_a, state_b, spec, permutations, int(group))
            _, columns = linear_sum_assignment(cost, maximize=True)
            if not np.array_equal(columns, permutations[group]):
                # Accept only a strict improvement, so that ties cannot make the descent cycle.
                old = cost[np.arange(len(columns)), permutations[group]].sum()
                new = cost[np.arange(len(columns)), columns].sum()
                if new > old + 1e-12 * max(abs(old), 1.0):
                    permutations[group] = columns
                    changed = True
        if not changed:
            return permutations, sweep
    return permutations, MAX_SWEEPS


def _cost_matrix(
    state_a: Mapping[str, torch.Tensor],
    state_b: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    permutations: list[np.ndarray],
    group: int,
) -> np.ndarray:
    """Return C[i, j], the inner product of A's unit i with B's unit j, the other layers permuted."""
    size = spec.sizes[group]
    cost = torch.zeros(size, size, dtype=torch.float64)
    for axis in spec.axes[group]:
        b = state_b[axis.key]
        for other, other_axes in enumerate(spec.axes):
            if other == group:
                continue
            for other_axis in other_axes:
                if other_axis.key == axis.key:
                    order = _expand(torch.as_tensor(permutations[other], dtype=torch.long), other_axis.repeat)
                    b = b.index_select(other_axis.axis, order.to(b.device))
        a_units = _units_first(state_a[axis.key].double(), axis)
        b_units = _units_first(b.double(), axis)
        cost += (a_units @ b_units.T).cpu()
    return cost.numpy()


def _units_first(tensor: torch.Tensor, axis: Axis) -> torch.Tensor:
    """Return the tensor as a matrix with one row per unit of the permuted axis."""
    moved = tensor.movedim(axis.axis, 0)
    return moved.reshape(moved.shape[0] // axis.repeat, -1)
