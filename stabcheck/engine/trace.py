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

Probes come from a CPU ``torch.Generator`` seeded with ``seed`` and are then moved to the
requested device and dtype, so the same seed gives the same probes on every device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

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
    if dim < 1:
        raise ValueError(f"hutchinson needs an operator of dimension at least 1, got dim={dim}")
    if (num_probes is None) == (target_rel_stderr is None):
        raise ValueError(
            "pass exactly one of num_probes (a fixed probe count) and target_rel_stderr (sequential stopping)"
        )
    if num_probes is not None and num_probes < 1:
        raise ValueError(f"num_probes must be at least 1, got {num_probes}")
    if target_rel_stderr is not None:
        if not target_rel_stderr > 0:
            raise ValueError(f"target_rel_stderr must be positive, got {target_rel_stderr}")
        if max_probes < 1:
            raise ValueError(f"max_probes must be at least 1, got {max_probes}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")

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

    deflated_trace, trace_stderr = _mean_and_stderr(trace_samples)
    deflated_square, square_stderr = _mean_and_stderr(square_samples)
    frobenius, frobenius_stderr = _root_with_stderr(exact_square + deflated_square, square_stderr)
    return TraceEstimate(
        trace=exact_trace + deflated_trace,
        trace_stderr=trace_stderr,
        frobenius_norm=frobenius,
        frobenius_stderr=frobenius_stderr,
        num_probes=num_probes,
        num_matvecs=sketch_size + basis.shape[1] + num_probes,
        method="hutch++",
        reached_target=True,
        target_rel_stderr=None,
        seed=seed,
    )


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
