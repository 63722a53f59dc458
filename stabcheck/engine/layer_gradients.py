r"""Per-example gradients of one layer module, from its inputs and output gradients.

A linear layer applied to one position per example has the per-example weight gradient
:math:`g_i = e_i a_i^\top`, with :math:`a_i` the layer's input and :math:`e_i` the gradient of
example i's loss with respect to the layer's output. So :math:`\lVert g_i \rVert^2 =
\lVert e_i \rVert^2 \lVert a_i \rVert^2`, and sums over examples are matrix products of the
stacked inputs and output gradients, without forming any :math:`g_i` (Goodfellow 2015,
"Efficient Per-Example Gradient Computations"). Layers over sequences and convolutions form
each :math:`g_i` from the inputs (unfolded into patches) and output gradients with one einsum.
Everything here is in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d)


class LayerRuleError(RuntimeError):
    """A module's hook did not see exactly one batch-first call, so the layer rule cannot apply."""


@dataclass
class Capture:
    calls: int = 0
    inputs: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None


@dataclass(frozen=True)
class Segments:
    """Consecutive runs of a chunk's rows: their span, each row's run, and the padded row table."""

    count: int
    span: slice
    segment_of: torch.Tensor
    rows: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def from_bounds(cls, bounds: list[tuple[int, int]], device: torch.device) -> Segments:
        lengths = torch.tensor([stop - start for start, stop in bounds], device=device)
        starts = torch.tensor([start for start, _ in bounds], device=device)
        steps = torch.arange(int(lengths.max()), device=device)
        mask = steps.unsqueeze(0) < lengths.unsqueeze(1)
        rows = torch.where(mask, starts.unsqueeze(1) + steps.unsqueeze(0), starts.unsqueeze(1))
        segment_of = torch.repeat_interleave(torch.arange(len(bounds), device=device), lengths)
        return cls(len(bounds), slice(bounds[0][0], bounds[-1][1]), segment_of, rows, mask)


@dataclass
class LayerTerms:
    """One layer module's per-example gradients over a chunk, in float64.

    A Linear layer on one position per example keeps its inputs and output gradients and never
    forms per-example gradients. Other layers keep each example's weight and bias gradient.
    """

    shapes: dict[str, torch.Size]
    inputs: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    per_example: dict[str, torch.Tensor] = field(default_factory=dict)
    _squared_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def materialized(self) -> bool:
        return self.inputs is None

    @classmethod
    def from_capture(cls, module: nn.Module, record: Capture, count: int) -> LayerTerms:
        if record.calls != 1:
            raise LayerRuleError(f"ran {record.calls} times in one forward pass, not once")
        if record.inputs is None or record.output_grad is None:
            raise LayerRuleError("has an input or output gradient that could not be recorded")
        if record.inputs.shape[0] != count or record.output_grad.shape[0] != count:
            raise LayerRuleError(f"saw a first dimension of {record.inputs.shape[0]}, not the batch size {count}")
        shapes = {local: p.shape for local, p in module._parameters.items() if p is not None}
        inputs = record.inputs.double()
        output_grad = record.output_grad.double()
        if isinstance(module, nn.Linear) and inputs.dim() == 2:
            return cls(shapes, inputs=inputs, output_grad=output_grad)
        if isinstance(module, nn.Linear):
            inputs = inputs.reshape(count, -1, inputs.shape[-1])
            output_grad = output_grad.reshape(count, -1, output_grad.shape[-1])
            weight = torch.einsum("kto,kti->koi", output_grad, inputs)
            bias = output_grad.sum(1)
        else:
            patches = unfold(module, inputs)
            output_grad = output_grad.reshape(count, output_grad.shape[1], -1)
            weight = torch.einsum("kol,kil->koi", output_grad, patches)
            bias = output_grad.sum(2)
        return cls(shapes, per_example={"weight": weight.reshape(count, *module.weight.shape), "bias": bias})

    def _squared(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._squared_cache is None:
            self._squared_cache = (self.inputs * self.inputs, self.output_grad * self.output_grad)
        return self._squared_cache

    def sq_norms(self, local: str) -> torch.Tensor:
        if not self.materialized:
            inputs_sq, output_grad_sq = self._squared()
            output_norms = output_grad_sq.sum(1)
            return output_norms * inputs_sq.sum(1) if local == "weight" else output_norms
        flat = self.per_example[local]
        flat = flat.reshape(flat.shape[0], -1)
        return (flat * flat).sum(1)

    def squares(self, local: str) -> torch.Tensor:
        if not self.materialized:
            inputs_sq, output_grad_sq = self._squared()
            return output_grad_sq.T @ inputs_sq if local == "weight" else output_grad_sq.sum(0)
        values = self.per_example[local]
        return (values * values).sum(0)

    def batch_sum_matches(self, local: str, batch_gradient: torch.Tensor, rtol: float, floor: float = 0.0) -> bool:
        """Check the rule's sum over the chunk against autograd's batch gradient.

        For a Linear weight the check compares both matrices times one random vector (seeded),
        which needs two matrix-vector products instead of forming the sum.
        """
        if self.materialized or local != "weight":
            total = self.per_example[local].sum(0) if self.materialized else self.output_grad.sum(0)
            return close_within(total, batch_gradient, rtol, floor)
        generator = torch.Generator(device=self.inputs.device).manual_seed(0)
        probe = torch.randn(self.inputs.shape[1], dtype=torch.float64, device=self.inputs.device, generator=generator)
        return close_within(self.output_grad.T @ (self.inputs @ probe), batch_gradient @ probe, rtol, floor)

    def segment_sums(self, local: str, segments: Segments) -> torch.Tensor:
        """Return the sums of the per-example gradients over each segment, stacked along dimension 0."""
        if self.materialized:
            values = self.per_example[local][segments.span]
        elif local != "weight":
            values = self.output_grad[segments.span]
        else:
            # One batched product over the segments' rows, padded to the longest with zeros.
            output_grad = self.output_grad[segments.rows] * segments.mask.unsqueeze(-1)
            return output_grad.transpose(1, 2) @ self.inputs[segments.rows]
        total = torch.zeros((segments.count, *values.shape[1:]), dtype=values.dtype, device=values.device)
        return total.index_add_(0, segments.segment_of, values)

    def segment_sq_norms(self, local: str, segments: Segments) -> torch.Tensor:
        """Return the squared norm of each segment's gradient sum.

        For a Linear weight, |E_s^T A_s|_F^2 equals the sum of (E_s E_s^T) * (A_s A_s^T), which
        costs n^2 (out + in) per segment of n rows instead of n * out * in, so the cheaper of the
        two is used.
        """
        if self.materialized or local != "weight":
            sums = self.segment_sums(local, segments)
            return torch.linalg.vector_norm(sums.reshape(segments.count, -1), dim=1).square()
        rows = segments.rows.shape[1]
        fan_out, fan_in = self.output_grad.shape[1], self.inputs.shape[1]
        if rows * (fan_out + fan_in) >= fan_out * fan_in:
            sums = self.segment_sums(local, segments)
            return torch.linalg.vector_norm(sums.reshape(segments.count, -1), dim=1).square()
        output_grad = self.output_grad[segments.rows] * segments.mask.unsqueeze(-1)
        inputs = self.inputs[segments.rows]
        return ((output_grad @ output_grad.transpose(1, 2)) * (inputs @ inputs.transpose(1, 2))).sum(dim=(1, 2))

    def gram(self, local: str, rows: torch.Tensor) -> torch.Tensor:
        if not self.materialized:
            output_grad = self.output_grad[rows]
            output_gram = output_grad @ output_grad.T
            if local != "weight":
                return output_gram
            inputs = self.inputs[rows]
            return output_gram * (inputs @ inputs.T)
        flat = self.per_example[local][rows].reshape(len(rows), -1)
        return flat @ flat.T


def recording_hook(record: Capture, *, keep_output_grad: bool = True):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        record.calls += 1
        record.inputs = args[0].detach() if args and isinstance(args[0], torch.Tensor) else None
        if not keep_output_grad:
            return

        def store(gradient: torch.Tensor) -> None:
            record.output_grad = gradient.detach()

        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(store)

    return hook


def unfold(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Return the convolution's input patches, shaped [k, in_channels * kernel size, positions]."""
    if isinstance(module, nn.Conv1d):
        return F.unfold(
            inputs.unsqueeze(2),
            (1, module.kernel_size[0]),
            dilation=(1, module.dilation[0]),
            padding=(0, module.padding[0]),
            stride=(1, module.stride[0]),
        )
    return F.unfold(inputs, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)


def close_within(value: torch.Tensor, reference: torch.Tensor, rtol: float, floor: float = 0.0) -> bool:
    """Return whether every entry is within ``rtol`` times the largest reference entry, or ``floor``.

    ``floor`` sets a least scale, such as the largest gradient entry of the whole module, so that a
    parameter whose exact gradient is zero (a key bias under softmax) is not judged by its rounding
    noise alone.
    """
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    scale = max(scale, floor)
    return bool(((value - reference).abs() <= rtol * scale + 1e-300).all())
