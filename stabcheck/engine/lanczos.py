r"""Lanczos iteration with full reorthogonalization for extreme eigenvalues of a symmetric operator.

After :math:`m` steps, :math:`A Q_m = Q_m T_m + \beta_{m+1} q_{m+1} e_m^T`. For an eigenpair
:math:`(\theta_i, s_i)` of the tridiagonal :math:`T_m`, the Ritz vector :math:`y_i = Q_m s_i` has
residual :math:`\lVert A y_i - \theta_i y_i \rVert = \beta_{m+1} |e_m^T s_i|`, and some eigenvalue
of :math:`A` lies within that residual of :math:`\theta_i` (Parlett, "The Symmetric Eigenvalue
Problem", 1998, theorem 4.5.1). That residual is the convergence test and the reported error bound.

Full reorthogonalization (two passes of classical Gram-Schmidt against every stored vector) keeps
:math:`Q_m` orthonormal to working precision, so no spurious copies of converged Ritz values
appear. It costs :math:`O(m n)` memory for :math:`m` steps on :math:`n` parameters.

NOTE: single-vector Lanczos finds each distinct eigenvalue once. An eigenvalue of multiplicity
greater than one appears once among the Ritz values, so ``top`` can skip repeated copies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class LanczosResult:
    """Ritz values and residuals after the last Lanczos step.

    ``top`` and ``bottom`` contain the largest and smallest algebraic Ritz values (``top``
    descending, ``bottom`` ascending) with their residual norms, recomputed explicitly unless
    the caller turned that off. ``residuals`` are the Lanczos estimates for all Ritz values.
    ``converged`` is true when every requested residual is at most ``tol`` times ``scale``, the
    largest Ritz value in absolute value.
    """

    ritz_values: np.ndarray
    residuals: np.ndarray
    top: np.ndarray
    top_residuals: np.ndarray
    bottom: np.ndarray
    bottom_residuals: np.ndarray
    converged: bool
    invariant_subspace: bool
    iterations: int
    num_matvecs: int
    tol: float
    scale: float
    seed: int

    @property
    def top_converged(self) -> np.ndarray:
        return self.top_residuals <= self.tol * self.scale

    @property
    def bottom_converged(self) -> np.ndarray:
        return self.bottom_residuals <= self.tol * self.scale


def basis_bytes(dim: int, max_iter: int, dtype: torch.dtype) -> int:
    """Return the bytes of the Krylov basis of :func:`lanczos` plus its three work vectors."""
    steps = max(1, min(max_iter, dim))
    return (steps + 1 + 3) * dim * (torch.finfo(dtype).bits // 8)


def lanczos(
    matvec: Matvec,
    dim: int,
    *,
    num_top: int = 1,
    num_bottom: int = 1,
    max_iter: int = 100,
    tol: float = 1e-4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: ProgressCallback | None = None,
    check_residuals: bool = True,
) -> LanczosResult:
    """Estimate the ``num_top`` largest and ``num_bottom`` smallest eigenvalues of a symmetric operator.

    The start vector is Gaussian from a CPU generator seeded with ``seed``, so the same seed gives
    the same start vector on every device. Iteration stops when all requested Ritz values have
    converged, when the Krylov space becomes invariant (then the Ritz values are exact
    eigenvalues), or after ``max_iter`` steps (at most ``dim``). With ``check_residuals``, the
    residuals of the requested Ritz pairs are then recomputed with one product each, and those
    explicit residuals decide ``converged``.
    """
    if dim < 1:
        raise ValueError("lanczos needs an operator of dimension at least 1")
    if num_top < 0 or num_bottom < 0 or num_top + num_bottom < 1:
        raise ValueError("request at least one eigenvalue (num_top + num_bottom >= 1)")
    max_iter = max(1, min(max_iter, dim))

    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = torch.randn(dim, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    basis = torch.empty((max_iter + 1, dim), dtype=dtype, device=device)
    basis[0] = start / torch.linalg.vector_norm(start)

    alphas: list[float] = []
    betas: list[float] = []
    invariant = False
    theta = np.zeros(0)
    vectors = np.zeros((0, 0))
    residuals = np.zeros(0)
    scale = 0.0
    requested_residual = np.inf

    for step in range(max_iter):
        w = matvec(basis[step]).to(dtype=dtype, device=device)
        alpha = float(torch.dot(w, basis[step]))
        alphas.append(alpha)
        w = _orthogonalize(w, basis[: step + 1])
        beta = float(torch.linalg.vector_norm(w))

        theta, vectors = tridiagonal_eigh(alphas, betas)
        residuals = beta * np.abs(vectors[-1, :])
        scale = float(np.max(np.abs(theta)))
        requested = _requested_indices(len(theta), num_top, num_bottom)
        requested_residual = float(np.max(residuals[requested]))
        if progress is not None:
            progress(step + 1, max_iter, requested_residual / scale if scale > 0 else 0.0)

        # beta at rounding level relative to the operator's scale: Q spans an invariant subspace.
        tiny = np.finfo(np.float64).eps * max(scale, np.finfo(np.float64).tiny) * np.sqrt(dim)
        if beta <= tiny:
            invariant = True
            break
        enough_values = len(theta) >= min(num_top + num_bottom, dim)
        if enough_values and requested_residual <= tol * scale:
            break
        if step + 1 < max_iter:
            betas.append(beta)
            basis[step + 1] = w / beta

    iterations = len(alphas)
    requested = _requested_indices(len(theta), num_top, num_bottom)
    checked = residuals.copy()
    if check_residuals:
        checked[requested] = _explicit_residuals(matvec, basis[:iterations], vectors[:, requested], theta[requested])
    order_desc = np.argsort(theta)[::-1]
    top_idx = order_desc[: min(num_top, len(theta))]
    bottom_idx = np.argsort(theta)[: min(num_bottom, len(theta))]
    enough_values = len(theta) >= min(num_top + num_bottom, dim)
    converged = enough_values and bool(np.max(checked[requested]) <= tol * scale)
    return LanczosResult(
        ritz_values=theta[order_desc],
        residuals=residuals[order_desc],
        top=theta[top_idx],
        top_residuals=checked[top_idx],
        bottom=theta[bottom_idx],
        bottom_residuals=checked[bottom_idx],
        converged=converged,
        invariant_subspace=invariant,
        iterations=iterations,
        num_matvecs=iterations + (len(requested) if check_residuals else 0),
        tol=tol,
        scale=scale,
        seed=seed,
    )


def _explicit_residuals(
    matvec: Matvec, basis: torch.Tensor, coefficients: np.ndarray, values: np.ndarray
) -> np.ndarray:
    """Compute |A y - theta y| for unit Ritz vectors y = Q s with one product each.

    Unlike the Lanczos estimate beta * |s_m|, this includes the rounding error of the products
    themselves, so it cannot report a residual below what the arithmetic can deliver.
    """
    vectors = basis.T @ torch.from_numpy(coefficients).to(dtype=basis.dtype, device=basis.device)
    result = np.empty(len(values))
    for column, value in enumerate(values):
        ritz_vector = vectors[:, column] / torch.linalg.vector_norm(vectors[:, column])
        product = matvec(ritz_vector).to(dtype=basis.dtype, device=basis.device)
        result[column] = float(torch.linalg.vector_norm(product - float(value) * ritz_vector))
    return result


def tridiagonalize(
    matvec: Matvec, start: torch.Tensor, num_steps: int
) -> tuple[list[float], list[float]]:
    """Run ``num_steps`` Lanczos steps from ``start`` and return the tridiagonal's coefficients.

    Returns ``alphas`` (diagonal) and ``betas`` (off-diagonal, one shorter). Stops early when the
    Krylov space becomes invariant, so fewer than ``num_steps`` coefficients can come back. Used
    by stochastic Lanczos quadrature, which needs T from a given start vector, not converged
    eigenpairs.
    """
    dim = start.numel()
    num_steps = max(1, min(num_steps, dim))
    basis = torch.empty((num_steps, dim), dtype=start.dtype, device=start.device)
    basis[0] = start / torch.linalg.vector_norm(start)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for step in range(num_steps):
        w = matvec(basis[step]).to(dtype=start.dtype, device=start.device)
        alphas.append(float(torch.dot(w, basis[step])))
        w = _orthogonalize(w, basis[: step + 1])
        beta = float(torch.linalg.vector_norm(w))
        scale = max(scale, abs(alphas[-1]), beta)
        if step + 1 == num_steps or beta <= np.finfo(np.float64).eps * scale * np.sqrt(dim):
            break
        betas.append(beta)
        basis[step + 1] = w / beta
    return alphas, betas


def tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of the symmetric tridiagonal matrix.

    torch's eigh runs on torch's thread pool. numpy's would start OpenBLAS threads that compete
    with torch's for the same cores (measured up to 2x slower on 2 cores).
    """
    values, vectors = torch.linalg.eigh(torch.from_numpy(_tridiagonal(alphas, betas)))
    return values.numpy(), vectors.numpy()


def _orthogonalize(w: torch.Tensor, stored: torch.Tensor) -> torch.Tensor:
    """Remove the components along the stored orthonormal rows, twice for working accuracy."""
    for _ in range(2):
        w = w - stored.T @ (stored @ w)
    return w


def _tridiagonal(alphas: list[float], betas: list[float]) -> np.ndarray:
    size = len(alphas)
    matrix = np.diag(np.asarray(alphas, dtype=np.float64))
    if size > 1:
        off = np.asarray(betas[: size - 1], dtype=np.float64)
        matrix += np.diag(off, 1) + np.diag(off, -1)
    return matrix


def _requested_indices(count: int, num_top: int, num_bottom: int) -> np.ndarray:
    """Indices into ascending Ritz values of the bottom ``num_bottom`` and top ``num_top``."""
    bottom = list(range(min(num_bottom, count)))
    top = list(range(max(0, count - num_top), count))
    return np.asarray(sorted(set(bottom + top)), dtype=int)
