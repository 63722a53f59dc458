r"""Stochastic estimates of the trace and Frobenius norm of a symmetric operator.

Hutchinson's estimator (Hutchinson, "A stochastic estimator of the trace of the influence
matrix for Laplacian smoothing splines", 1990) averages quadratic forms of random probes
:math:`v` with :math:`\mathbb{E}[v v^T] = I`:

.. math::

    \operatorname{tr}(H) = \mathbb{E}[v^T H v], \qquad
    \lVert H \rVert_F^2 = \operatorname{tr}(H^2) = \mathbb{E}[\lVert H v \rVert^2].

Both expectations hold for Rademacher and Gaussian probes, so the same products :math:`H v`
give both estimates. For Rademacher probes
:math:`\operatorname{Var}[v^T H v] = 2 (\lVert H \rVert_F^2 - \sum_i H_{ii}^2)`
(Avron & Toledo 2011, "Randomized algorithms for estimating the trace of an implicit symmetric
positive semi-definite matrix"), so a diagonal operator is estimated exactly.

Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation")
computes the trace exactly on an approximate top eigenspace and runs Hutchinson only on the
deflated rest. That lowers the variance when a few large eigenvalues dominate the trace.
:func:`deflated_hutchinson` does the same with a Lanczos (Krylov) basis in place of the one-pass
sketch. A Krylov space of k products approximates the extreme eigenvectors far better than a
sketch of k random vectors, and the tridiagonal coefficients give the exact part without a
second pass.

Probes come from a CPU ``torch.Generator`` seeded with ``seed`` and are then moved to the
requested device and dtype, so the same seed gives the same probes on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from stabcheck.engine.lanczos import orthogonalize

Matvec = Callable[[torch.Tensor], torch.Tensor]

# Names of the estimators, as --trace-method takes them.
TRACE_METHODS = ("hutchinson", "hutch++", "deflated")

# Minimum number of probes before a sequential run may stop. The sample standard deviation of n
# samples is itself uncertain by about 1/sqrt(2(n-1)): 24% at 10 probes, 13% at 30.
MIN_SEQUENTIAL_PROBES = 30


@dataclass(frozen=True)
class TraceEstimate:
    """Estimated trace and Frobenius norm with their standard errors.

    ``trace_stderr`` and ``frobenius_stderr`` are estimated standard errors (sample standard
    deviation with ``ddof=1`` divided by the square root of the sample count). They are
    ``inf`` when fewer than two samples exist. ``frobenius_norm`` and ``frobenius_stderr`` are
    ``None`` only where a method cannot estimate them. ``reached_target`` is ``False`` only when
    a sequential run stopped at ``max_probes`` before its standard error met
    ``target_rel_stderr``; fixed-count runs have no target and report ``True``.
    """

    trace: float
    trace_stderr: float
    frobenius_norm: float | None
    frobenius_stderr: float | None
    num_probes: int
    num_matvecs: int
    method: str
    reached_target: bool
    target_rel_stderr: float | None
    seed: int
    # Vectors of the deflation basis (Hutch++ and the deflated method); 0 for plain Hutchinson.
    basis_size: int = 0


def hutchinson(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int = 1000,
    batch: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    r"""Estimate :math:`\operatorname{tr}(H)` and :math:`\lVert H \rVert_F` with Rademacher probes.

    Each probe :math:`v` costs one product and yields the samples :math:`v^T H v` and
    :math:`\lVert H v \rVert^2`. The Frobenius norm is :math:`\sqrt{m}` with :math:`m` the mean of
    the second samples, and its standard error comes from the delta method,
    :math:`\mathrm{se}(m) / (2 \sqrt{m})`.

    Pass exactly one of ``num_probes`` (fixed count) and ``target_rel_stderr`` (sequential).
    A sequential run draws ``batch`` probes at a time and stops once at least
    ``MIN_SEQUENTIAL_PROBES`` probes give ``trace_stderr <= target_rel_stderr * |trace|``, or
    after ``max_probes`` probes with ``reached_target=False``. The test uses the absolute value,
    so a negative trace can meet it, while a trace near zero usually runs to ``max_probes``.
    The first ``n`` probes are the same for a given seed in both modes.
    """
    _check_settings("hutchinson", dim, num_probes, 1, target_rel_stderr, max_probes, 1, batch)

    generator = torch.Generator(device="cpu").manual_seed(seed)
    trace_samples: list[float] = []
    square_samples: list[float] = []
    reached = True
    limit = num_probes if num_probes is not None else max_probes
    step = limit if num_probes is not None else batch

    while len(trace_samples) < limit:
        for _ in range(min(step, limit - len(trace_samples))):
            probe = rademacher_probe(dim, generator, dtype, device)
            product = matvec(probe).to(dtype=dtype, device=device)
            trace_samples.append(float(torch.dot(probe, product)))
            square_samples.append(float(torch.dot(product, product)))
        if target_rel_stderr is None:
            continue
        trace, stderr = _mean_and_stderr(trace_samples)
        if len(trace_samples) >= MIN_SEQUENTIAL_PROBES and stderr <= target_rel_stderr * abs(trace):
            break
    else:
        # The loop ran to the probe limit: a sequential run missed its target.
        reached = target_rel_stderr is None

    trace, trace_stderr = _mean_and_stderr(trace_samples)
    frobenius, frobenius_stderr = _root_with_stderr(*_mean_and_stderr(square_samples))
    return TraceEstimate(
        trace=trace,
        trace_stderr=trace_stderr,
        frobenius_norm=frobenius,
        frobenius_stderr=frobenius_stderr,
        num_probes=len(trace_samples),
        num_matvecs=len(trace_samples),
        method="hutchinson",
        reached_target=reached,
        target_rel_stderr=target_rel_stderr,
        seed=seed,
    )


def hutch_plus_plus(
    matvec: Matvec,
    dim: int,
    *,
    num_matvecs: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    r"""Estimate :math:`\operatorname{tr}(H)` and :math:`\lVert H \rVert_F` with Hutch++.

    The budget of :math:`m` products is split into :math:`k = \lfloor m/3 \rfloor` products
    for a sketch :math:`H S`, :math:`k` products for :math:`H Q`, where :math:`Q` is the
    orthonormal factor of the reduced QR decomposition of :math:`H S`, and the remaining
    :math:`g = m - 2k` products for Hutchinson probes :math:`v` on the deflated operator. With
    :math:`P = I - Q Q^T`,

    .. math::

        \operatorname{tr}(H) = \operatorname{tr}(Q^T H Q) + \operatorname{tr}(P H P), \qquad
        \lVert H \rVert_F^2 = \lVert H Q \rVert_F^2 + \lVert H P \rVert_F^2,

    where the second identity is true because every row of :math:`H Q Q^T` is orthogonal to
    every row of :math:`H P`. The first terms are computed exactly, and the second terms are the means of
    :math:`(P v)^T H (P v)` and :math:`\lVert H P v \rVert^2`. The standard errors are those of
    these means, with the delta method for the norm. ``num_probes`` in the result is :math:`g`.
    When ``dim < k``, :math:`Q` has only ``dim`` columns and the run uses fewer products than
    ``num_matvecs``. The result counts the products actually computed. Memory: a few blocks of
    :math:`\mathrm{dim} \times k` values during the QR decomposition, one block after it.
    """
    if dim < 1:
        raise ValueError(f"hutch_plus_plus needs an operator of dimension at least 1, got dim={dim}")
    if num_matvecs < 3:
        raise ValueError(f"hutch_plus_plus needs num_matvecs >= 3 (one each for sketch, basis and probe), got {num_matvecs}")
    sketch_size = num_matvecs // 3
    num_probes = num_matvecs - 2 * sketch_size
    generator = torch.Generator(device="cpu").manual_seed(seed)

    sketch = torch.empty((dim, sketch_size), dtype=dtype, device=device)
    for column in range(sketch_size):
        sketch[:, column] = matvec(rademacher_probe(dim, generator, dtype, device)).to(dtype=dtype, device=device)
    # Householder QR returns an orthonormal Q even when H S is rank deficient, and the split
    # of the trace is exact for any orthonormal Q.
    basis = torch.linalg.qr(sketch, mode="reduced").Q
    del sketch

    exact_trace = 0.0
    exact_square = 0.0
    for column in range(basis.shape[1]):
        direction = basis[:, column].contiguous()
        product = matvec(direction).to(dtype=dtype, device=device)
        exact_trace += float(torch.dot(direction, product))
        exact_square += float(torch.dot(product, product))

    trace_samples: list[float] = []
    square_samples: list[float] = []
    for _ in range(num_probes):
        probe = rademacher_probe(dim, generator, dtype, device)
        projected = probe - basis @ (basis.T @ probe)
        product = matvec(projected).to(dtype=dtype, device=device)
        trace_samples.append(float(torch.dot(projected, product)))
        square_samples.append(float(torch.dot(product, product)))

    return _split_estimate(
        exact_trace,
        exact_square,
        trace_samples,
        square_samples,
        num_matvecs=sketch_size + basis.shape[1] + num_probes,
        method="hutch++",
        reached_target=True,
        target_rel_stderr=None,
        seed=seed,
        basis_size=basis.shape[1],
    )


def deflated_hutchinson(
    matvec: Matvec,
    dim: int,
    *,
    num_probes: int | None = None,
    target_rel_stderr: float | None = None,
    max_probes: int = 1000,
    max_basis: int | None = None,
    batch: int = 10,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    r"""Estimate :math:`\operatorname{tr}(H)` and :math:`\lVert H \rVert_F` by Hutchinson on a Krylov-deflated operator.

    Lanczos with full reorthogonalization builds an orthonormal basis :math:`Q` of a Krylov space
    from a Rademacher start. With :math:`P = I - Q Q^T`, the trace splits as
    :math:`\operatorname{tr}(Q^T H Q) + \operatorname{tr}(P H P)`. The first term is the sum of the
    Lanczos diagonal, which is exact. The second is the mean of :math:`(P v)^T H (P v)` over Rademacher
    probes drawn after :math:`Q` is fixed. Given :math:`Q` those samples are independent and
    unbiased, so their standard error is the estimate's. The Frobenius norm uses
    :math:`\lVert H \rVert_F^2 = \lVert H Q \rVert_F^2 + \mathbb{E}\lVert H P v \rVert^2`, the first term
    summed from the Lanczos products.

    A fixed budget (``num_probes``, at least 3 products) spends half on the basis and the rest on
    probes. A sequential run (``target_rel_stderr``) first draws ``MIN_SEQUENTIAL_PROBES`` plain
    Hutchinson probes, the same ones :func:`hutchinson` draws with this seed. When they meet the
    target, their estimate is returned with no basis. Otherwise they give
    :math:`\lVert H \rVert_F^2` and the sample variance, which predict how many probes the deflated
    operator still needs: its squared Frobenius norm is
    :math:`\lVert H \rVert_F^2 - \lVert H Q \rVert_F^2 - \beta_k^2`. The basis grows while the
    predicted total of basis and probe products falls. Then the predicted number of probes (at
    least ``MIN_SEQUENTIAL_PROBES``) is drawn in one go. Only when their standard error misses
    the target do more probes follow, ``batch`` at a time, until
    ``trace_stderr <= target_rel_stderr * |trace|``.
    Every product counts against ``max_probes``; past it the result has ``reached_target=False``.
    The prediction only sizes the basis; the reported error comes from the probes alone.

    ``max_basis`` caps the basis (its memory is ``max_basis * dim`` values of ``dtype``).
    ``num_probes`` in the result counts the probes on the deflated operator, or the plain probes
    when no basis was built; ``basis_size`` counts the basis vectors.
    """
    _check_settings("deflated_hutchinson", dim, num_probes, 3, target_rel_stderr, max_probes, MIN_SEQUENTIAL_PROBES, batch)
    if max_basis is not None and max_basis < 0:
        raise ValueError(f"max_basis must be at least 0, got {max_basis}")

    generator = torch.Generator(device="cpu").manual_seed(seed)
    budget = num_probes if num_probes is not None else max_probes
    cap = min(dim, budget if max_basis is None else max_basis)
    products = 0
    planner: _BasisPlanner | None = None
    # Samples of the estimate's own probes. Plain pilot probes stay in them only when no basis is built.
    trace_samples: list[float] = []
    square_samples: list[float] = []
    if num_probes is not None:
        cap = min(cap, num_probes // 2)
    else:
        for _ in range(MIN_SEQUENTIAL_PROBES):
            _sample(matvec, rademacher_probe(dim, generator, dtype, device), trace_samples, square_samples)
        products = MIN_SEQUENTIAL_PROBES
        trace, stderr = _mean_and_stderr(trace_samples)
        # Leave room for the probes that a standard error needs.
        cap = min(cap, budget - products - MIN_SEQUENTIAL_PROBES)
        if stderr > target_rel_stderr * abs(trace) and cap > 0:
            planner = _BasisPlanner(trace_samples, square_samples, target_rel_stderr * abs(trace))
            trace_samples, square_samples = [], []
        else:
            cap = 0

    basis = torch.empty((cap, dim), dtype=dtype, device=device)
    size, exact_trace, exact_square, last_beta = 0, 0.0, 0.0, 0.0
    if cap > 0:
        start = rademacher_probe(dim, generator, dtype, device)
        basis[0] = start / torch.linalg.vector_norm(start)
        scale = 0.0
        while True:
            product = matvec(basis[size]).to(dtype=dtype, device=device)
            products += 1
            alpha = float(torch.dot(basis[size], product))
            exact_trace += alpha
            exact_square += float(torch.dot(product, product))
            size += 1
            product = orthogonalize(product, basis[:size])
            last_beta = float(torch.linalg.vector_norm(product))
            scale = max(scale, abs(alpha), last_beta)
            invariant = last_beta <= np.finfo(np.float64).eps * scale * math.sqrt(dim)
            if size == cap or invariant or (planner is not None and planner.done(size, exact_square + last_beta**2)):
                break
            basis[size] = product / last_beta
    basis = basis[:size]

    # Products left for probes; pilot probes kept as samples count in both.
    limit = budget - products + len(trace_samples)
    # The first draw is sized from the pilot alone, before any of its samples exist. Stopping at
    # the first count whose own standard error meets the target favours runs of low spread. For
    # the right-skewed samples of a Hessian those are runs of low mean, so on digits-mlp that
    # rule gave a mean error of -0.9 standard errors over 12 seeds (0.0 with the sized draw).
    planned = 0
    if planner is not None:
        planned = min(limit, math.ceil(planner.predicted_probes(exact_square + last_beta**2)))
    reached = True
    step = limit if target_rel_stderr is None else batch
    while len(trace_samples) < limit:
        if target_rel_stderr is not None and len(trace_samples) >= planned:
            rest, stderr = _mean_and_stderr(trace_samples) if trace_samples else (0.0, math.inf)
            if len(trace_samples) >= MIN_SEQUENTIAL_PROBES and stderr <= target_rel_stderr * abs(exact_trace + rest):
                break
        count = max(step, planned - len(trace_samples))
        for _ in range(min(count, limit - len(trace_samples))):
            probe = rademacher_probe(dim, generator, dtype, device)
            _sample(matvec, probe - basis.T @ (basis @ probe) if size else probe, trace_samples, square_samples)
    else:
        rest, stderr = _mean_and_stderr(trace_samples)
        reached = target_rel_stderr is None or stderr <= target_rel_stderr * abs(exact_trace + rest)
    products = budget - limit + len(trace_samples)

    return _split_estimate(
        exact_trace,
        exact_square,
        trace_samples,
        square_samples,
        num_matvecs=products,
        method="deflated",
        reached_target=reached,
        target_rel_stderr=target_rel_stderr,
        seed=seed,
        basis_size=size,
    )


class _BasisPlanner:
    r"""Decide when a larger Krylov basis stops paying for itself in probes.

    Rademacher probes on an operator :math:`A` have variance :math:`2 (\lVert A \rVert_F^2 -
    \sum_i A_{ii}^2)`. The pilot probes measure :math:`\lVert H \rVert_F^2` and the variance, and
    their ratio ``shape`` estimates the unknown diagonal share on the deflated operator. While
    the basis grows, the squared norm is taken two standard errors high, so that noise rarely
    stops it early. The first draw of probes is sized with the estimate itself. The predicted cost of a basis of size k is k plus the probes its deflated operator needs, at least
    ``MIN_SEQUENTIAL_PROBES``. The basis stops growing once the cost has not improved for
    ``max(10, k / 5)`` steps, or once it cannot fall further.
    """

    def __init__(self, trace_samples: list[float], square_samples: list[float], target_stderr: float) -> None:
        _, stderr = _mean_and_stderr(trace_samples)
        variance = stderr**2 * len(trace_samples)
        mean_square, square_stderr = _mean_and_stderr(square_samples)
        self.shape = min(1.0, variance / (2 * mean_square)) if mean_square > 0 else 1.0
        self.frobenius_squared = mean_square
        # Two standard errors above the estimate, for growing the basis: a basis stopped early by
        # an underestimate can leave thousands of probes to draw, one built a little too far
        # costs its few products.
        self.frobenius_squared_high = mean_square + 2 * square_stderr
        self.target_variance = target_stderr**2
        self.best_cost = math.inf
        self.best_size = 0

    def predicted_probes(self, captured_square: float, *, high: bool = False) -> float:
        """Return the probes needed once the basis captures ``captured_square`` of the squared norm."""
        total = self.frobenius_squared_high if high else self.frobenius_squared
        rest = max(total - captured_square, 0.0)
        return max(float(MIN_SEQUENTIAL_PROBES), 2 * self.shape * rest / self.target_variance)

    def done(self, size: int, captured_square: float) -> bool:
        probes = self.predicted_probes(captured_square, high=True)
        cost = size + probes
        if cost < self.best_cost:
            self.best_cost, self.best_size = cost, size
        return probes <= MIN_SEQUENTIAL_PROBES or size - self.best_size >= max(10, size // 5)


def _split_estimate(
    exact_trace: float,
    exact_square: float,
    trace_samples: list[float],
    square_samples: list[float],
    **fields: object,
) -> TraceEstimate:
    """Combine the exact part on a basis with the probe means on the deflated rest."""
    deflated_trace, trace_stderr = _mean_and_stderr(trace_samples)
    deflated_square, square_stderr = _mean_and_stderr(square_samples)
    frobenius, frobenius_stderr = _root_with_stderr(exact_square + deflated_square, square_stderr)
    return TraceEstimate(
        trace=exact_trace + deflated_trace,
        trace_stderr=trace_stderr,
        frobenius_norm=frobenius,
        frobenius_stderr=frobenius_stderr,
        num_probes=len(trace_samples),
        **fields,
    )


def _check_settings(
    name: str,
    dim: int,
    num_probes: int | None,
    fewest_probes: int,
    target_rel_stderr: float | None,
    max_probes: int,
    fewest_max_probes: int,
    batch: int,
) -> None:
    """Raise ValueError for settings that a fixed-count or sequential estimator cannot run with."""
    if dim < 1:
        raise ValueError(f"{name} needs an operator of dimension at least 1, got dim={dim}")
    if (num_probes is None) == (target_rel_stderr is None):
        raise ValueError(
            "pass exactly one of num_probes (a fixed product count) and target_rel_stderr (sequential stopping)"
        )
    if num_probes is not None and num_probes < fewest_probes:
        raise ValueError(f"{name} needs num_probes >= {fewest_probes}, got {num_probes}")
    if target_rel_stderr is None:
        return
    if not target_rel_stderr > 0:
        raise ValueError(f"target_rel_stderr must be positive, got {target_rel_stderr}")
    if max_probes < fewest_max_probes:
        raise ValueError(f"max_probes must be at least {fewest_max_probes}, got {max_probes}")
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")


def _sample(matvec: Matvec, probe: torch.Tensor, trace_samples: list[float], square_samples: list[float]) -> None:
    """Append the samples probe^T H probe and |H probe|^2 of one product."""
    product = matvec(probe).to(dtype=probe.dtype, device=probe.device)
    trace_samples.append(float(torch.dot(probe, product)))
    square_samples.append(float(torch.dot(product, product)))


def rademacher_probe(
    dim: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """Draw a vector of independent +1/-1 entries from a CPU generator, then move it to ``device``."""
    signs = torch.randint(0, 2, (dim,), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(dtype=dtype, device=device)


def _mean_and_stderr(samples: list[float]) -> tuple[float, float]:
    """Return the sample mean and its standard error (ddof=1), ``inf`` for one sample.

    The samples are shifted by the first one before summing. That keeps the variance accurate
    when the spread is small against the mean, and exactly zero when all samples are equal.
    """
    values = np.asarray(samples, dtype=np.float64)
    count = values.size
    shifted = values - values[0]
    mean = float(values[0] + shifted.mean())
    if count < 2:
        return mean, math.inf
    variance = float(np.sum((shifted - shifted.mean()) ** 2) / (count - 1))
    return mean, math.sqrt(variance / count)


def _root_with_stderr(mean: float, stderr: float) -> tuple[float, float]:
    """Return sqrt(mean) and its delta-method standard error stderr / (2 sqrt(mean))."""
    # Rounding can leave a tiny negative mean for an operator that is zero.
    root = math.sqrt(max(mean, 0.0))
    if root == 0.0:
        return 0.0, 0.0 if stderr == 0.0 else math.inf
    return root, stderr / (2.0 * root)
