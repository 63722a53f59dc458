"""A zoo of tiny problems with dense float64 references, shared by the tests.

Every case is small enough (at most a few hundred parameters) for the full Hessian to be built
with ``torch.autograd.functional.hessian`` and diagonalized with ``torch.linalg.eigvalsh``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from stabcheck.engine.objective import builtin_loss


class TiedAutoencoder(nn.Module):
    """Encoder and decoder share one weight matrix, as tied embeddings and output layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 4) * 0.5)
        self.bias = nn.Parameter(torch.randn(6) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(x @ self.weight.T + self.bias)
        return hidden @ self.weight


class WithUnusedHead(nn.Module):
    """An MLP with an extra layer that the forward pass never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.unused_head = nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _cnn_with_batchnorm() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 3, kernel_size=3),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 3),
    )
    batchnorm = model[1]
    batchnorm.running_mean.copy_(torch.randn(3) * 0.2)
    batchnorm.running_var.copy_(torch.rand(3) + 0.5)
    batchnorm.num_batches_tracked.fill_(7)
    return model


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: torch.Tensor
    targets: torch.Tensor
    loss: str


def _classification(num_samples: int, shape: tuple[int, ...], num_classes: int, generator: torch.Generator):
    inputs = torch.randn(num_samples, *shape, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
    return inputs, targets


def make_case(name: str, seed: int = 0) -> Case:
    """Build one zoo case in float64, with weights and data fixed by ``seed``."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed + 1)
    if name == "linear":
        model = nn.Linear(4, 3)
        inputs, targets = _classification(24, (4,), 3, generator)
        loss = "cross_entropy"
    elif name == "mlp":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        inputs, targets = _classification(32, (4,), 3, generator)
        loss = "cross_entropy"
    elif name == "mlp_mse":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        inputs = torch.randn(32, 4, generator=generator, dtype=torch.float64)
        targets = torch.nn.functional.one_hot(torch.randint(0, 3, (32,), generator=generator), 3).double()
        loss = "mse"
    elif name == "cnn_bn":
        model = _cnn_with_batchnorm()
        inputs, targets = _classification(16, (1, 6, 6), 3, generator)
        loss = "cross_entropy"
    elif name == "tied":
        model = TiedAutoencoder()
        inputs, targets = _classification(20, (4,), 4, generator)
        loss = "cross_entropy"
    elif name == "unused":
        model = WithUnusedHead()
        inputs, targets = _classification(20, (4,), 3, generator)
        loss = "cross_entropy"
    elif name == "dropout":
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
        inputs, targets = _classification(20, (4,), 3, generator)
        loss = "cross_entropy"
    else:
        raise KeyError(name)
    return Case(name, model.double(), inputs, targets, loss)


CASE_NAMES = ("linear", "mlp", "mlp_mse", "cnn_bn", "tied", "unused", "dropout")


def dense_hessian(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss: str | Callable,
    weight_decay: dict[str, float] | None = None,
) -> torch.Tensor:
    """Build the full Hessian of the mean loss (plus coupled L2 decay) in eval mode, in float64."""
    loss_fn = builtin_loss(loss) if isinstance(loss, str) else loss
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named]).double()
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    was_training = model.training
    model.eval()

    def objective(theta: torch.Tensor) -> torch.Tensor:
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            size = shape.numel()
            params[name] = theta[offset : offset + size].view(shape)
            offset += size
        outputs = functional_call(model, {**params, **buffers}, (inputs,))
        value = loss_fn(outputs, targets).mean()
        for name, decay in (weight_decay or {}).items():
            value = value + 0.5 * decay * params[name].pow(2).sum()
        return value

    hessian = torch.autograd.functional.hessian(objective, flat)
    model.train(was_training)
    return (hessian + hessian.T) / 2


def relative_error(estimate: float, reference: float) -> float:
    return abs(estimate - reference) / max(abs(reference), 1e-300)
