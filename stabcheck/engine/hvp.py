"""Hessian-vector products of an :class:`~stabcheck.engine.objective.Objective` at a fixed point.

Two methods, both over ``torch.func.functional_call`` on detached parameter copies:

``retained`` (default)
    Builds the first-order gradient graph once (``create_graph=True``) and differentiates it
    again for each vector with ``retain_graph=True``. Measured on 2 CPU cores (benchmarks/
    results page) this is the cheapest per product, at the cost of keeping the graph of every
    analysis example in memory for the whole estimate.
``recompute``
    Re-runs forward and first backward for each vector, chunk by chunk, so memory is bounded by
    one chunk. Each product then costs one extra forward and backward.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from stabcheck.engine.memory import saved_tensor_meter
from stabcheck.engine.objective import NonFiniteError, Objective, ParameterLayout, nonfinite_parameters

HVP_METHODS = ("retained", "recompute")


class HessianOperator:
    """The symmetric operator v -> H v on flat vectors, with H the Hessian of the objective.

    Parameters that the forward pass never uses have a zero gradient and zero Hessian rows; they
    are listed in ``unused_parameters``. ``num_matvecs`` counts the products computed so far.
    When the objective is split over several processes, the loss, the gradient and every
    product are summed over the ranks, so every rank gets the full objective's values.
    """

    def __init__(self, objective: Objective, *, method: str = "retained") -> None:
        if method not in HVP_METHODS:
            raise ValueError(f"unknown HVP method {method!r}; use one of {HVP_METHODS}")
        self.objective = objective
        self.layout = objective.layout
        self.method = method
        self.dim = objective.dim
        self.dtype = objective.dtype
        self.device = objective.device
        self.num_matvecs = 0
        self._params = [objective.point[name].clone().requires_grad_(True) for name in self.layout.names]
        self._retained: list[torch.Tensor | None] | None = None

        group = objective.group
        gradients, loss = self._first_order(keep_graph=method == "retained")
        self.loss = float(group.sum_(loss.reshape(1).clone())[0]) if group.is_distributed else float(loss)
        self.unused_parameters = tuple(
            name for name, gradient in zip(self.layout.names, gradients) if gradient is None
        )
        self.gradient = group.sum_(
            self.layout.flatten(
                [
                    torch.zeros_like(p) if g is None else g.detach()
                    for p, g in zip(self._params, gradients)
                ]
            )
        )
        _check_finite(self.layout, self.gradient, "the gradient")
        if method == "retained":
            self._retained = gradients

    def _param_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.layout.names, self._params))

    def _first_order(self, *, keep_graph: bool) -> tuple[list[torch.Tensor | None], torch.Tensor]:
        params = self._param_dict()
        total: list[torch.Tensor | None] = [None] * len(self._params)
        loss_value = torch.zeros((), dtype=self.dtype, device=self.device)
        pieces = [self.objective.chunk_loss(params, x, y) for x, y in self.objective.chunks()]
        decay = self.objective.decay_term(params)
        if decay is not None:
            pieces.append(decay)
        for piece in pieces:
            gradients = torch.autograd.grad(
                piece, self._params, create_graph=True, allow_unused=True, retain_graph=keep_graph
            )
            total = [_add(a, b) for a, b in zip(total, gradients)]
            loss_value = loss_value + piece.detach()
        return total, loss_value

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """Return H @ vector for a flat vector of length ``dim``."""
        pieces = self.layout.unflatten(vector.to(dtype=self.dtype, device=self.device))
        if self.method == "retained":
            assert self._retained is not None
            products = self._second_order(self._retained, pieces, retain=True)
        else:
            params = self._param_dict()
            products = [None] * len(self._params)
            terms = [self.objective.chunk_loss(params, x, y) for x, y in self.objective.chunks()]
            decay = self.objective.decay_term(params)
            if decay is not None:
                terms.append(decay)
            for term in terms:
                gradients = torch.autograd.grad(term, self._params, create_graph=True, allow_unused=True)
                products = [_add(a, b) for a, b in zip(products, self._second_order(list(gradients), pieces, retain=False))]
        self.num_matvecs += 1
        product = self.objective.group.sum_(
            self.layout.flatten([torch.zeros_like(p) if h is None else h for p, h in zip(self._params, products)])
        )
        _check_finite(self.layout, product, "a Hessian-vector product")
        return product

    def _second_order(
        self, gradients: list[torch.Tensor | None], pieces: list[torch.Tensor], *, retain: bool
    ) -> list[torch.Tensor | None]:
        # Gradients that do not depend on the parameters (the objective is linear in them)
        # contribute nothing; autograd cannot differentiate them, so they are left out.
        outputs, grad_outputs = [], []
        for gradient, piece in zip(gradients, pieces):
            if gradient is not None and gradient.requires_grad:
                outputs.append(gradient)
                grad_outputs.append(piece)
        if not outputs:
            return [None] * len(self._params)
        products = torch.autograd.grad(
            outputs, self._params, grad_outputs=grad_outputs, retain_graph=retain, allow_unused=True
        )
        return [None if h is None else h.detach() for h in products]

    def release(self) -> None:
        """Drop the retained graph so its memory can be freed."""
        self._retained = None
        if self.method == "retained":
            self.method = "recompute"


# Example counts whose saved tensors are measured; the difference gives the cost per example.
PROBE_SIZES = (4, 12)


def saved_bytes_fit(objective: Objective, *, create_graph: bool) -> tuple[float, float]:
    """Return (fixed, per-example) bytes that autograd saves for the loss and its gradient.

    Saved tensors are measured over two small numbers of examples. Their difference gives the
    bytes per example, and the rest is a fixed part (weight-sized tensors that the backward saves).
    ``create_graph`` measures the graph that Hessian-vector products need; without it, one
    gradient's.
    """
    params = {name: value.clone().requires_grad_(True) for name, value in objective.point.items()}
    measured = []
    sizes = sorted({min(size, objective.num_samples) for size in PROBE_SIZES})
    for count in sizes:
        with torch.enable_grad(), saved_tensor_meter(exclude=params.values()) as saved:
            loss = objective.chunk_loss(params, objective.inputs[:count], objective.targets[:count])
            torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
        measured.append(saved[0])
    if len(sizes) == 1:
        return 0.0, measured[0] / sizes[0]
    per_example = max(measured[1] - measured[0], 0) / (sizes[1] - sizes[0])
    return max(measured[0] - per_example * sizes[0], 0.0), per_example


def estimate_operator_bytes(objective: Objective, method: str, fit: tuple[float, float] | None = None) -> int:
    """Estimate the bytes a :class:`HessianOperator` of ``objective`` keeps while it is used.

    The per-example part of :func:`saved_bytes_fit` is scaled to the examples the method keeps
    in memory at once: every example for ``retained``, one chunk for ``recompute``. It is
    counted three times, for the first backward's graph and the gradient tensors of both
    backward passes, and three flat vectors are added. On the digits MLP of the fixtures the
    estimate came within 10% of the resident memory the operator added (16.8 MiB measured for
    1797 examples). ``fit`` passes a :func:`saved_bytes_fit` result measured before.
    """
    fixed, per_example = fit if fit is not None else saved_bytes_fit(objective, create_graph=True)
    graph_examples = objective.num_samples if method == "retained" else min(objective.chunk_size, objective.num_samples)
    itemsize = torch.finfo(objective.dtype).bits // 8
    return int(3 * (fixed + per_example * graph_examples)) + 3 * objective.dim * itemsize


def _check_finite(layout: ParameterLayout, vector: torch.Tensor, what: str) -> None:
    """Raise NonFiniteError naming the parameters where ``vector`` has inf or NaN entries."""
    # An inf or NaN entry makes the sum inf or NaN, so a finite sum proves every entry finite in
    # one read of the vector. The isfinite masks took about 7% of a product's time on a 1e6 MLP.
    if math.isfinite(float(vector.sum())) or bool(torch.isfinite(vector).all()):
        return
    names = nonfinite_parameters(layout, vector)
    raise NonFiniteError(
        f"{what} has inf or NaN entries for parameter(s) {', '.join(names[:5])}"
        f"{' and more' if len(names) > 5 else ''}, so no estimate is reported. With --forward-dtype "
        "float16 this is usually an overflow; use bfloat16 or float32."
    )


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def scaled_operator(operator: Callable[[torch.Tensor], torch.Tensor], scale: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Return v -> D H D v with D = diag(scale), the symmetric form of a diagonal preconditioning."""

    def matvec(vector: torch.Tensor) -> torch.Tensor:
        return scale * operator(scale * vector)

    return matvec


def module_blocks(names: tuple[str, ...]) -> dict[str, list[str]]:
    """Group parameter names by the module that owns them (the name up to its last dot).

    Blocks keep the order of first appearance, so they follow the model's parameter order.
    """
    blocks: dict[str, list[str]] = {}
    for name in names:
        owner = name.rpartition(".")[0] or "(root)"
        blocks.setdefault(owner, []).append(name)
    return blocks


def restricted_operator(
    matvec: Callable[[torch.Tensor], torch.Tensor], layout: ParameterLayout, names: list[str]
) -> tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    """Return the product with the diagonal Hessian block of ``names``, and the block's size.

    The block H_BB is the curvature of the objective when only those parameters move. Each
    product costs one full Hessian-vector product: the vector is zero outside the block.
    """
    slices = [layout.slice(name) for name in names]
    dim = sum(piece.stop - piece.start for piece in slices)

    def block_matvec(vector: torch.Tensor) -> torch.Tensor:
        full = torch.zeros(layout.dim, dtype=vector.dtype, device=vector.device)
        offset = 0
        for piece in slices:
            size = piece.stop - piece.start
            full[piece] = vector[offset : offset + size]
            offset += size
        product = matvec(full)
        return torch.cat([product[piece] for piece in slices])

    return block_matvec, dim
