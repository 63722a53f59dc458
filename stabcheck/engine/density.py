r"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a unit probe :math:`q`, :math:`m` Lanczos steps from :math:`q` give a tridiagonal
:math:`T_m = S \Theta S^T`. Gauss quadrature with nodes :math:`\theta_i` (the eigenvalues of
:math:`T_m`) and weights :math:`\tau_i = (e_1^T s_i)^2` approximates

.. math::

    q^T f(H) q \approx \sum_{i=1}^{m} \tau_i f(\theta_i), \qquad \sum_i \tau_i = 1,

exactly for polynomials :math:`f` of degree up to :math:`2m - 1`. Averaging over random probes
with :math:`\mathbb{E}[q q^T] = I / n` estimates :math:`\operatorname{tr}(f(H)) / n`, the
integral of :math:`f` against the spectral density (Ubaru, Chen & Saad 2017, "Fast Estimation of
tr(f(A)) via Stochastic Lanczos Quadrature"). Replacing each node by a narrow Gaussian gives a
smooth density, as Ghorbani, Krishnan & Xiao 2019 ("An Investigation into Neural Net
Optimization via Hessian Eigenvalue Density") do for neural-network Hessians.

With :math:`f(\lambda) = \lambda`, the first moment :math:`\sum_i \tau_i \theta_i = q^T H q`
(the Rayleigh quotient of the probe), so ``dim`` times the mean first moment is a Hutchinson
trace estimate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stabcheck.engine.lanczos import tridiagonal_eigh, tridiagonalize
from stabcheck.engine.trace import rademacher_probe

Matvec = Callable[[torch.Tensor], torch.Tensor]
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SpectralDensity:
    """Quadrature nodes and weights of each probe, from stochastic Lanczos quadrature.

    ``nodes[p]`` and ``weights[p]`` are the nodes (ascending) and weights of probe ``p``. A probe
    has fewer than ``num_steps`` nodes when its Krylov space became invariant early. Each
    probe's weights sum to 1.
    """

    nodes: tuple[np.ndarray, ...]
    weights: tuple[np.ndarray, ...]
    num_probes: int
    num_steps: int
    num_matvecs: int
    dim: int
    probes: str
    seed: int

    def moment(self, order: int = 1) -> float:
        r"""Estimate :math:`\operatorname{tr}(H^k) / n` as the probe mean of :math:`\sum_i \tau_i \theta_i^k`.

        Exact for each probe when :math:`k \le 2 m - 1` with :math:`m` Lanczos steps.
        """
        return float(np.mean([np.sum(w * t**order) for t, w in zip(self.nodes, self.weights)]))

    def trace(self) -> float:
        """Estimate tr(H) as ``dim`` times the first moment."""
        return self.dim * self.moment(1)

    def broadened(self, grid: np.ndarray, sigma: float) -> np.ndarray:
        r"""Evaluate the Gaussian-broadened density on ``grid``.

        .. math::

            \phi_\sigma(t) = \frac{1}{P} \sum_{p=1}^{P} \sum_i \tau_{p,i}
                \frac{1}{\sigma \sqrt{2 \pi}} \exp\left(-\frac{(t - \theta_{p,i})^2}{2 \sigma^2}\right)

        Its integral over the real line is 1, so over a grid that extends a few ``sigma``
        past the extreme nodes it is close to 1.
        """
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = np.asarray(grid, dtype=np.float64)
        nodes = np.concatenate(self.nodes)
        weights = np.concatenate(self.weights) / self.num_probes
        density = np.zeros_like(grid)
        # Chunks over the grid bound the temporary (grid chunk) x (all nodes) matrix.
        chunk = max(1, 2**20 // max(1, nodes.size))
        for start in range(0, grid.size, chunk):
            offsets = (grid.ravel()[start : start + chunk, None] - nodes[None, :]) / sigma
            kernel = np.exp(-0.5 * offsets**2) / (sigma * math.sqrt(2.0 * math.pi))
            density.ravel()[start : start + chunk] = kernel @ weights
        return density

    def default_grid(self, num_points: int = 1000, relative_sigma: float = 0.01) -> tuple[np.ndarray, float]:
        """Choose an evenly spaced grid and a broadening width from the range of the nodes.

        ``sigma`` is ``relative_sigma`` times the spread of the nodes, and the grid extends
        6 ``sigma`` past the extreme nodes, so less than 1e-8 of the mass falls outside. When all
        nodes coincide, the spread is taken as the node's magnitude, or 1 for a zero node.
        """
        nodes = np.concatenate(self.nodes)
        low, high = float(nodes.min()), float(nodes.max())
        spread = high - low
        if spread == 0.0:
            spread = abs(high) if high != 0.0 else 1.0
        sigma = relative_sigma * spread
        grid = np.linspace(low - 6.0 * sigma, high + 6.0 * sigma, num_points)
        return grid, sigma


def spectral_density(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int = 1,
    num_steps: int = 80,
    probes: str = "rademacher",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> SpectralDensity:
    """Run stochastic Lanczos quadrature with ``num_probes`` probes of ``num_steps`` steps each.

    Probes are Rademacher or Gaussian vectors drawn in turn from one CPU generator seeded with
    ``seed``. With Rademacher probes, ``result.trace()`` equals the Hutchinson trace from
    ``hutchinson(..., num_probes=num_probes, seed=seed)``, because both draw the same probes.
    Each probe costs up to ``min(num_steps, dim)`` products and ``num_steps x dim`` values of
    memory for the Lanczos basis, which is kept fully reorthogonalized.
    """
    if dim < 1:
        raise ValueError(f"spectral_density needs an operator of dimension at least 1, got dim={dim}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if probes not in PROBE_DISTRIBUTIONS:
        raise ValueError(f"invalid probe distribution {probes!r}: use one of {PROBE_DISTRIBUTIONS}")

    generator = torch.Generator(device="cpu").manual_seed(seed)
    all_nodes: list[np.ndarray] = []
    all_weights: list[np.ndarray] = []
    num_matvecs = 0
    for _ in range(num_probes):
        if probes == "rademacher":
            start = rademacher_probe(dim, generator, dtype, device)
        else:
            start = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
        # tridiagonalize normalizes the start vector, so T belongs to the unit probe q.
        alphas, betas = tridiagonalize(matvec, start, num_steps)
        num_matvecs += len(alphas)
        values, vectors = tridiagonal_eigh(alphas, betas)
        all_nodes.append(values)
        all_weights.append(vectors[0, :] ** 2)

    return SpectralDensity(
        nodes=tuple(all_nodes),
        weights=tuple(all_weights),
        num_probes=num_probes,
        num_steps=num_steps,
        num_matvecs=num_matvecs,
        dim=dim,
        probes=probes,
        seed=seed,
    )
