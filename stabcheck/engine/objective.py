r"""The training objective as a function of the model's parameters.

.. math::

    L(\theta) = \frac{1}{N} \sum_{i=1}^{N} \ell(f(x_i; \theta), y_i)
                + \sum_j \frac{w_j}{2} \lVert \theta_j \rVert^2

over a fixed analysis set, where :math:`w_j` is the coupled L2 weight decay that the optimizer
applies to parameter :math:`j` (SGD's and Adam's ``weight_decay``; AdamW's decoupled decay is not
part of the objective). The model runs through ``torch.func.functional_call`` on copies of its
parameters and buffers, so the module itself, its ``.grad`` fields and its buffers stay as they were.

Split over several processes, each rank computes on a shard of the analysis set, N is the size of
the whole set, so the ranks' values, gradients and Hessian-vector products add up to the
objective's. The regularizer belongs to rank 0 alone, so that the sum counts it once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from stabcheck.engine.distributed import SINGLE_PROCESS, SingleProcess
from stabcheck.errors import DataError, SpecError

PerExampleLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
BUILTIN_LOSSES = ("cross_entropy", "mse")


def cross_entropy_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction="none")


def mse_per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over each example's elements.

    The mean of these values equals ``F.mse_loss(outputs, targets)`` with mean reduction over
    all elements, because every example has the same number of elements.
    """
    if targets.shape != outputs.shape:
        raise ValueError(
            f"mse needs targets shaped like the outputs {tuple(outputs.shape)}, got {tuple(targets.shape)}"
            " (class-index targets need --loss cross_entropy, or one-hot encoding)"
        )
    squared = F.mse_loss(outputs, targets.to(outputs.dtype), reduction="none")
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def builtin_loss(name: str) -> PerExampleLoss:
    if name == "cross_entropy":
        return cross_entropy_per_example
    if name == "mse":
        return mse_per_example
    raise SpecError(f"--loss {name!r} is not a built-in loss ({', '.join(BUILTIN_LOSSES)}) or a file.py:function spec.")


MODEL_MODES = ("eval", "train-bn-batch-stats")


@contextlib.contextmanager
def module_mode(model: torch.nn.Module, *, training: bool, batchnorm_only: bool = False) -> Iterator[None]:
    """Put every submodule (or only the BatchNorm layers) in train or eval mode, then restore
    each one's own flag."""
    saved = [(module, module.training) for module in model.modules()]
    if batchnorm_only:
        model.eval()
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.train(training)
    else:
        model.train(training)
    try:
        yield
    finally:
        for module, flag in saved:
            module.training = flag


@dataclass(frozen=True)
class ParameterLayout:
    """Names, shapes and offsets of the trainable parameters in the flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]

    @property
    def dim(self) -> int:
        return self.offsets[-1]

    def slice(self, name: str) -> slice:
        index = self.names.index(name)
        return slice(self.offsets[index], self.offsets[index + 1])

    def flatten(self, tensors: Mapping[str, torch.Tensor] | list[torch.Tensor]) -> torch.Tensor:
        if isinstance(tensors, Mapping):
            tensors = [tensors[name] for name in self.names]
        return torch.cat([t.reshape(-1) for t in tensors])

    def unflatten(self, vector: torch.Tensor) -> list[torch.Tensor]:
        return [
            vector[self.offsets[i] : self.offsets[i + 1]].view(shape)
            for i, shape in enumerate(self.shapes)
        ]


class Objective:
    """Mean per-example loss of a model over a fixed analysis set, in a chosen dtype and device.

    The model runs in eval mode unless ``training=True``. ``mode="train-bn-batch-stats"`` runs
    BatchNorm layers on the statistics of the whole analysis set, as one batch, with every other
    module (dropout included) in eval mode. ``chunk_size`` bounds how many examples one forward
    pass processes, and the loss does not depend on it, except in that mode, which needs a single
    chunk.

    ``group`` is the process group when the analysis set is split over several processes:
    ``inputs`` and ``targets`` are then this rank's shard, ``num_samples`` counts the shard, and
    ``total_samples`` and ``sample_offset`` place it in the whole set.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        loss: PerExampleLoss,
        *,
        weight_decay: Mapping[str, float] | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        chunk_size: int | None = None,
        training: bool = False,
        mode: str = "eval",
        group: SingleProcess | None = None,
        forward_dtype: torch.dtype | None = None,
    ) -> None:
        if mode not in MODEL_MODES:
            raise ValueError(f"model mode {mode!r} is unknown; use one of {', '.join(MODEL_MODES)}")
        self.mode = mode
        self.model = model
        self.loss_fn = loss
        self.dtype = dtype
        # Mixed precision: the forward runs under torch.autocast in this dtype, while the
        # parameters, the loss, gradients and Hessian-vector products stay in ``dtype``.
        self.forward_dtype = forward_dtype
        self.device = torch.device(device)
        self.training = training
        self.inputs = _cast(inputs, dtype, self.device)
        self.targets = _cast(targets, dtype, self.device)
        self.num_samples = int(self.inputs.shape[0])
        self.group = group or SINGLE_PROCESS
        shard_sizes = self.group.gather_rows(torch.tensor([self.num_samples], dtype=torch.int64)).tolist()
        self.total_samples = int(sum(shard_sizes))
        self.sample_offset = int(sum(shard_sizes[: self.group.rank]))
        self.chunk_size = chunk_size or self.num_samples
        if mode == "train-bn-batch-stats" and self.chunk_size < self.num_samples:
            raise ValueError("BatchNorm batch statistics need the whole analysis set in one chunk")

        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise SpecError("the model has no trainable parameters (requires_grad=True); nothing to analyze.")
        offsets = [0]
        for _, parameter in trainable:
            offsets.append(offsets[-1] + parameter.numel())
        self.layout = ParameterLayout(
            names=tuple(name for name, _ in trainable),
            shapes=tuple(p.shape for _, p in trainable),
            offsets=tuple(offsets),
        )
        self.point = {name: _cast(p.detach(), dtype, self.device).clone() for name, p in trainable}
        self.frozen = {
            name: _cast(p.detach(), dtype, self.device).clone()
            for name, p in model.named_parameters()
            if not p.requires_grad
        }
        self.buffers = {name: _cast(b.detach(), dtype, self.device).clone() for name, b in model.named_buffers()}
        self.weight_decay = {name: float(w) for name, w in (weight_decay or {}).items() if w}

    @property
    def dim(self) -> int:
        return self.layout.dim

    @property
    def couples_examples(self) -> bool:
        """Whether one example's output depends on the rest of its batch (BatchNorm batch statistics)."""
        return self.training or self.mode == "train-bn-batch-stats"

    def flat_point(self) -> torch.Tensor:
        return self.layout.flatten(self.point)

    def outputs(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> torch.Tensor:
        # Buffers are cloned for each call so that a train-mode forward cannot update them in place.
        state = {**self.frozen, **params, **{name: b.clone() for name, b in self.buffers.items()}}
        batch_stats = self.mode == "train-bn-batch-stats"
        with module_mode(self.model, training=self.training or batch_stats, batchnorm_only=batch_stats), double_backward_kernels(
            self.model, self.device
        ):
            if self.forward_dtype is None:
                return functional_call(self.model, state, (inputs,), strict=True)
            with torch.autocast(device_type=self.device.type, dtype=self.forward_dtype):
                outputs = functional_call(self.model, state, (inputs,), strict=True)
            if outputs.is_floating_point() and not bool(torch.isfinite(outputs).all()):
                raise NonFiniteError(
                    f"the model's outputs overflowed in {str(self.forward_dtype).replace('torch.', '')} "
                    f"(first in {first_overflowing_module(self, state, inputs)}). Use a wider "
                    "--forward-dtype (bfloat16 has float32's range) or analyze without it."
                )
            # The loss and everything after it accumulate in the analysis dtype.
            return outputs.to(self.dtype) if outputs.is_floating_point() else outputs

    def chunks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, self.chunk_size):
            stop = start + self.chunk_size
            yield self.inputs[start:stop], self.targets[start:stop]

    def per_example_losses(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        try:
            outputs = self.outputs(params, inputs)
            losses = self.loss_fn(outputs, targets)
        except (RuntimeError, ValueError, IndexError) as error:
            raise DataError(
                f"the loss cannot be computed on the model's outputs and the data's targets "
                f"(inputs {tuple(inputs.shape)}, targets {tuple(targets.shape)} {targets.dtype}): "
                f"{str(error).splitlines()[0]}. Check --loss against the targets the data spec returns."
            ) from None
        if not isinstance(losses, torch.Tensor) or losses.shape != (inputs.shape[0],):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise SpecError(
                f"the loss returned {shape} for a batch of {inputs.shape[0]} examples; expected one "
                f"loss per example, shape ({inputs.shape[0]},). A loss spec must not reduce over the batch."
            )
        return losses

    def chunk_loss(self, params: Mapping[str, torch.Tensor], inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """This chunk's share of the objective: its loss sum over N, without the decay term.

        N is the size of the whole analysis set, over every rank.
        """
        return self.per_example_losses(params, inputs, targets).sum() / self.total_samples

    def decay_term(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor | None:
        """Return the weight-decay term, or None without decay and on every rank but rank 0."""
        if self.group.rank != 0:
            return None
        terms = [0.5 * w * params[name].pow(2).sum() for name, w in self.weight_decay.items() if name in params]
        return torch.stack(terms).sum() if terms else None

    def value(self, params: Mapping[str, torch.Tensor] | None = None) -> float:
        params = self.point if params is None else params
        with torch.no_grad():
            total = sum(self.chunk_loss(params, x, y) for x, y in self.chunks())
            decay = self.decay_term(params)
            if decay is not None:
                total = total + decay
            if self.group.is_distributed:
                total = self.group.sum_(total.reshape(1).clone())[0]
        return float(total)


@contextlib.contextmanager
def double_backward_kernels(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Select kernels that support a second backward pass for a forward on ``device``.

    On CUDA, fused scaled_dot_product_attention kernels (flash, memory-efficient) and cuDNN's
    RNN kernels have no double backward. Attention then runs its math kernel, and cuDNN is
    switched off for models that contain an RNN. Dropout stays off either way. On the CPU the
    default kernels support double backward, and nothing changes.
    """
    if device.type != "cuda":
        yield
        return
    # NOTE: no GPU was available when this was written; the CUDA path is checked on the CPU only.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if uses_rnn(model):
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


def uses_rnn(model: torch.nn.Module) -> bool:
    return any(isinstance(module, torch.nn.RNNBase) for module in model.modules())


def kernel_notes(model: torch.nn.Module, device: torch.device) -> list[str]:
    """Describe the kernel choices of :func:`double_backward_kernels` for the report."""
    if device.type != "cuda":
        return []
    notes = [
        "on CUDA, scaled_dot_product_attention runs its math kernel during the analysis, because the "
        "fused kernels have no double backward"
    ]
    if uses_rnn(model):
        notes.append("cuDNN is off during the analysis, because its RNN kernels have no double backward")
    return notes


class NonFiniteError(ArithmeticError):
    """A forward pass, gradient or Hessian-vector product produced inf or NaN."""


def first_overflowing_module(objective: Objective, state: Mapping[str, torch.Tensor], inputs: torch.Tensor) -> str:
    """Run the forward again with hooks and describe the first module whose output is not finite."""
    found: list[str] = []

    def watch(name: str):
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not found and isinstance(output, torch.Tensor) and output.is_floating_point():
                if not bool(torch.isfinite(output).all()):
                    found.append(name or "(root)")

        return hook

    handles = [module.register_forward_hook(watch(name)) for name, module in objective.model.named_modules()]
    try:
        with torch.no_grad(), torch.autocast(device_type=objective.device.type, dtype=objective.forward_dtype):
            functional_call(objective.model, state, (inputs,), strict=True)
    finally:
        for handle in handles:
            handle.remove()
    # Hooks fire when a module finishes, so the innermost overflowing module comes first.
    if not found:
        return "an operation outside the model's modules"
    name = found[0]
    module = objective.model if name == "(root)" else objective.model.get_submodule(name)
    owned = [f"{name}.{key}" if name != "(root)" else key for key, _ in module.named_parameters(recurse=False)]
    return f"module {name!r}" + (f", parameters {', '.join(owned)}" if owned else "")


def nonfinite_parameters(layout: ParameterLayout, vector: torch.Tensor) -> list[str]:
    """Return the names of the parameters whose slice of a flat vector has inf or NaN entries."""
    return [name for name, piece in zip(layout.names, layout.unflatten(vector)) if not bool(torch.isfinite(piece).all())]


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if tensor.is_floating_point():
        return tensor.to(device=device, dtype=dtype)
    return tensor.to(device=device)
