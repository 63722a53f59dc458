"""Hutchinson, Hutch++ and deflated Hutchinson trace estimates against exact traces of dense matrices and zoo Hessians."""

import math

import numpy as np
import pytest
import torch
from cases import dense_hessian, make_case

from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.trace import MIN_SEQUENTIAL_PROBES, deflated_hutchinson, hutch_plus_plus, hutchinson


def zoo_operator(name):
    case = make_case(name)
    objective = Objective(case.model, case.inputs, case.targets, builtin_loss(case.loss), dtype=torch.float64)
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    return HessianOperator(objective), dense


def symmetric_with_eigenvalues(eigenvalues, seed):
    """Return Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    orthogonal, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    return orthogonal @ torch.diag(values) @ orthogonal.T


def dense_matvec(matrix):
    return lambda vector: matrix @ vector


@pytest.mark.parametrize("name", ["mlp", "tied", "cnn_bn"])
def test_hutchinson_zoo_within_three_stderr(name):
    operator, dense = zoo_operator(name)
    exact_trace = float(torch.trace(dense))
    exact_frobenius = float(torch.linalg.matrix_norm(dense))
    estimate = hutchinson(operator.matvec, operator.dim, num_probes=200, seed=1)
    assert abs(estimate.trace - exact_trace) <= 3 * estimate.trace_stderr
    assert abs(estimate.frobenius_norm - exact_frobenius) <= 3 * estimate.frobenius_stderr
    assert estimate.num_matvecs == 200
    assert operator.num_matvecs == 200
    assert estimate.reached_target


@pytest.mark.parametrize("name", ["mlp", "tied", "cnn_bn"])
def test_hutch_plus_plus_zoo_within_three_stderr(name):
    operator, dense = zoo_operator(name)
    exact_trace = float(torch.trace(dense))
    exact_frobenius = float(torch.linalg.matrix_norm(dense))
    estimate = hutch_plus_plus(operator.matvec, operator.dim, num_matvecs=60, seed=2)
    assert abs(estimate.trace - exact_trace) <= 3 * estimate.trace_stderr
    assert abs(estimate.frobenius_norm - exact_frobenius) <= 3 * estimate.frobenius_stderr
    assert estimate.num_matvecs == 60
    assert operator.num_matvecs == 60
    assert estimate.num_probes == 20


def test_hutchinson_error_shrinks_with_probes():
    _, dense = zoo_operator("mlp")
    exact_trace = float(torch.trace(dense))
    seeds = range(24)

    def rms_error(num_probes):
        errors = [hutchinson(dense_matvec(dense), dense.shape[0], num_probes=num_probes, seed=seed).trace - exact_trace for seed in seeds]
        return math.sqrt(np.mean(np.square(errors)))

    # The standard error scales as 1/sqrt(n), so 16x more probes should cut the error by 4x.
    # The bounds allow for the spread of an RMS over 24 seeds.
    ratio = rms_error(16) / rms_error(256)
    assert 2.5 < ratio
    assert ratio < 6.5


def test_hutchinson_stderr_matches_rademacher_variance():
    matrix = symmetric_with_eigenvalues(np.linspace(-1.0, 3.0, 50), seed=4)
    # For Rademacher probes, Var[v^T A v] = 2 (|A|_F^2 - sum_i A_ii^2).
    variance = 2 * (float(torch.sum(matrix**2)) - float(torch.sum(torch.diagonal(matrix) ** 2)))
    estimate = hutchinson(dense_matvec(matrix), 50, num_probes=400, seed=5)
    expected_stderr = math.sqrt(variance / 400)
    assert estimate.trace_stderr == pytest.approx(expected_stderr, rel=0.15)


def test_hutchinson_diagonal_is_exact():
    generator = torch.Generator().manual_seed(6)
    diagonal = torch.randn(300, generator=generator, dtype=torch.float64) * 10
    estimate = hutchinson(lambda vector: diagonal * vector, 300, num_probes=12, seed=7)
    assert estimate.trace == pytest.approx(float(diagonal.sum()), rel=1e-14, abs=1e-12)
    assert estimate.trace_stderr == 0.0


def test_hutchinson_diagonal_frobenius_is_exact():
    generator = torch.Generator().manual_seed(6)
    diagonal = torch.randn(300, generator=generator, dtype=torch.float64)
    estimate = hutchinson(lambda vector: diagonal * vector, 300, num_probes=12, seed=7)
    # |D v|^2 = sum_i d_i^2 for every sign vector v.
    assert estimate.frobenius_norm == pytest.approx(float(torch.linalg.vector_norm(diagonal)), rel=1e-14)
    assert estimate.frobenius_stderr == 0.0


def test_hutchinson_negative_trace_keeps_sign():
    eigenvalues = np.linspace(-3.0, 0.5, 60)
    matrix = symmetric_with_eigenvalues(eigenvalues, seed=8)
    exact_trace = float(np.sum(eigenvalues))
    estimate = hutchinson(dense_matvec(matrix), 60, target_rel_stderr=0.05, max_probes=500, batch=10, seed=9)
    assert exact_trace < 0
    assert estimate.trace < 0
    assert estimate.reached_target
    assert estimate.trace_stderr <= 0.05 * abs(estimate.trace)
    assert abs(estimate.trace - exact_trace) <= 3 * estimate.trace_stderr
    assert estimate.num_probes < 500


def test_hutchinson_sequential_zero_trace_hits_max_probes():
    eigenvalues = np.concatenate([np.arange(1.0, 31.0), -np.arange(1.0, 31.0)])
    matrix = symmetric_with_eigenvalues(eigenvalues, seed=10)
    estimate = hutchinson(dense_matvec(matrix), 60, target_rel_stderr=0.01, max_probes=155, batch=20, seed=11)
    assert not estimate.reached_target
    assert estimate.num_probes == 155
    assert estimate.num_matvecs == 155
    assert estimate.target_rel_stderr == 0.01


def test_hutchinson_sequential_needs_minimum_probes():
    # A diagonal operator has zero sample variance from the first probe on, so only the
    # minimum count keeps the run going.
    diagonal = torch.linspace(1.0, 2.0, 30, dtype=torch.float64)
    estimate = hutchinson(lambda vector: diagonal * vector, 30, target_rel_stderr=0.1, batch=7, seed=0)
    assert estimate.reached_target
    # The first multiple of the batch size at or above the minimum.
    assert estimate.num_probes == -(-MIN_SEQUENTIAL_PROBES // 7) * 7
    assert estimate.num_probes >= MIN_SEQUENTIAL_PROBES


def test_hutchinson_same_seed_same_probes():
    matrix = symmetric_with_eigenvalues(np.linspace(-1.0, 2.0, 20), seed=12)
    fixed = hutchinson(dense_matvec(matrix), 20, num_probes=30, seed=13)
    sequential = hutchinson(dense_matvec(matrix), 20, target_rel_stderr=1e-9, max_probes=30, batch=7, seed=13)
    assert sequential.trace == fixed.trace
    assert sequential.trace_stderr == fixed.trace_stderr


def test_hutchinson_rejects_both_or_neither_mode():
    with pytest.raises(ValueError, match="exactly one"):
        hutchinson(lambda vector: vector, 5, seed=0)
    with pytest.raises(ValueError, match="exactly one"):
        hutchinson(lambda vector: vector, 5, num_probes=10, target_rel_stderr=0.1, seed=0)


def test_hutch_plus_plus_beats_hutchinson_on_low_rank():
    size, rank = 200, 10
    generator = torch.Generator().manual_seed(14)
    basis, _ = torch.linalg.qr(torch.randn(size, rank, generator=generator, dtype=torch.float64))
    low_rank = basis @ torch.diag(torch.linspace(10.0, 100.0, rank, dtype=torch.float64)) @ basis.T
    noise = torch.randn(size, size, generator=generator, dtype=torch.float64) * 1e-3
    matrix = low_rank + (noise + noise.T) / 2
    exact_trace = float(torch.trace(matrix))

    hutchinson_errors = []
    plus_plus_errors = []
    for seed in range(5):
        plain = hutchinson(dense_matvec(matrix), size, num_probes=60, seed=seed)
        deflated = hutch_plus_plus(dense_matvec(matrix), size, num_matvecs=60, seed=seed)
        hutchinson_errors.append(abs(plain.trace - exact_trace))
        plus_plus_errors.append(abs(deflated.trace - exact_trace))
    # The sketch of 20 columns captures the rank-10 part exactly, leaving only the small noise.
    assert np.mean(plus_plus_errors) < 0.01 * np.mean(hutchinson_errors)


def test_hutch_plus_plus_sketch_wider_than_dim():
    matrix = symmetric_with_eigenvalues([3.0, -1.0, 2.0, 0.5, 4.0], seed=17)
    estimate = hutch_plus_plus(dense_matvec(matrix), 5, num_matvecs=30, seed=18)
    # Q spans the whole space after 5 of the 10 basis products, so the rest are skipped.
    assert estimate.num_matvecs == 25
    assert estimate.trace == pytest.approx(8.5, abs=1e-12)
    assert estimate.trace_stderr < 1e-12


def test_hutch_plus_plus_exact_on_low_rank():
    matrix = symmetric_with_eigenvalues([5.0, -2.0, 1.0] + [0.0] * 37, seed=15)
    estimate = hutch_plus_plus(dense_matvec(matrix), 40, num_matvecs=12, seed=16)
    assert estimate.trace == pytest.approx(4.0, abs=1e-10)
    assert estimate.frobenius_norm == pytest.approx(math.sqrt(30.0), abs=1e-10)
    assert estimate.trace_stderr < 1e-10


def decaying_spectrum(size, seed):
    """A symmetric matrix with a few large eigenvalues of both signs over a slowly decaying bulk."""
    values = np.concatenate([[40.0, 25.0, -15.0, 12.0, 9.0], 2.0 / np.sqrt(np.arange(1, size - 4))])
    return symmetric_with_eigenvalues(values, seed=seed)


@pytest.mark.parametrize("name", ["mlp", "tied", "cnn_bn"])
def test_deflated_zoo_within_three_stderr(name):
    operator, dense = zoo_operator(name)
    exact_trace = float(torch.trace(dense))
    exact_frobenius = float(torch.linalg.matrix_norm(dense))
    estimate = deflated_hutchinson(operator.matvec, operator.dim, num_probes=60, seed=3)
    assert abs(estimate.trace - exact_trace) <= 3 * estimate.trace_stderr
    assert abs(estimate.frobenius_norm - exact_frobenius) <= 3 * estimate.frobenius_stderr
    assert estimate.num_matvecs == operator.num_matvecs == 60
    assert estimate.basis_size + estimate.num_probes == 60
    assert estimate.method == "deflated"


def test_deflated_stderr_is_calibrated():
    # Over many seeds, the reported standard error must describe the actual error: about 95% of
    # the estimates within 2 standard errors, and an RMS z-score near 1.
    matrix = decaying_spectrum(300, seed=21)
    exact_trace = float(torch.trace(matrix))
    z_scores = []
    for seed in range(200):
        estimate = deflated_hutchinson(dense_matvec(matrix), 300, num_probes=40, seed=seed)
        z_scores.append((estimate.trace - exact_trace) / estimate.trace_stderr)
    z_scores = np.asarray(z_scores)
    assert 0.9 <= np.mean(np.abs(z_scores) <= 2.0) <= 0.99
    assert 0.8 <= math.sqrt(np.mean(z_scores**2)) <= 1.25
    # No bias: the mean z-score of 200 independent runs lies within about 3 / sqrt(200).
    assert abs(np.mean(z_scores)) < 0.25


def test_deflated_beats_hutchinson_at_equal_products():
    matrix = decaying_spectrum(400, seed=22)
    exact_trace = float(torch.trace(matrix))
    plain_errors, deflated_errors = [], []
    for seed in range(20):
        plain = hutchinson(dense_matvec(matrix), 400, num_probes=80, seed=seed)
        deflated = deflated_hutchinson(dense_matvec(matrix), 400, num_probes=80, seed=seed)
        plain_errors.append((plain.trace - exact_trace) ** 2)
        deflated_errors.append((deflated.trace - exact_trace) ** 2)
    # The 40 Krylov vectors hold the five outliers, so the mean squared error falls many times over.
    assert np.mean(deflated_errors) < 0.1 * np.mean(plain_errors)


def test_deflated_sequential_reaches_target_with_fewer_products():
    matrix = decaying_spectrum(400, seed=23)
    exact_trace = float(torch.trace(matrix))
    plain = hutchinson(dense_matvec(matrix), 400, target_rel_stderr=0.005, max_probes=20000, seed=5)
    deflated = deflated_hutchinson(dense_matvec(matrix), 400, target_rel_stderr=0.005, max_probes=20000, seed=5)
    assert plain.reached_target and deflated.reached_target
    assert deflated.trace_stderr <= 0.005 * abs(deflated.trace)
    assert abs(deflated.trace - exact_trace) <= 3 * deflated.trace_stderr
    assert deflated.basis_size > 0
    assert deflated.num_probes >= MIN_SEQUENTIAL_PROBES
    # Pilot, basis and probes are all counted.
    assert deflated.num_matvecs == MIN_SEQUENTIAL_PROBES + deflated.basis_size + deflated.num_probes
    assert deflated.num_matvecs < plain.num_matvecs / 3


def test_deflated_loose_target_returns_pilot():
    matrix = symmetric_with_eigenvalues(np.linspace(1.0, 2.0, 50), seed=24)
    plain = hutchinson(dense_matvec(matrix), 50, target_rel_stderr=0.5, max_probes=200, seed=6)
    deflated = deflated_hutchinson(dense_matvec(matrix), 50, target_rel_stderr=0.5, max_probes=200, seed=6)
    assert deflated.basis_size == 0
    assert deflated.num_matvecs == plain.num_matvecs == MIN_SEQUENTIAL_PROBES
    assert deflated.trace == plain.trace
    assert deflated.trace_stderr == plain.trace_stderr
    assert deflated.reached_target


def test_deflated_respects_the_product_budget():
    matrix = decaying_spectrum(300, seed=25)
    # A target that 100 products cannot meet: the run stops at the budget and reports the miss.
    estimate = deflated_hutchinson(dense_matvec(matrix), 300, target_rel_stderr=1e-6, max_probes=100, seed=7)
    assert estimate.num_matvecs == 100
    assert not estimate.reached_target
    assert estimate.num_probes >= MIN_SEQUENTIAL_PROBES
    assert abs(estimate.trace - float(torch.trace(matrix))) <= 4 * estimate.trace_stderr


def test_deflated_max_basis_caps_the_basis():
    matrix = decaying_spectrum(300, seed=26)
    estimate = deflated_hutchinson(dense_matvec(matrix), 300, target_rel_stderr=0.001, max_probes=2000, max_basis=7, seed=8)
    assert estimate.basis_size == 7


def test_deflated_exact_when_the_basis_spans_the_space():
    matrix = symmetric_with_eigenvalues([3.0, -1.0, 2.0, 0.5, 4.0, -6.0], seed=27)
    estimate = deflated_hutchinson(dense_matvec(matrix), 6, num_probes=20, seed=9)
    # The Krylov space becomes invariant after 6 steps, so the deflated rest is zero.
    assert estimate.basis_size == 6
    assert estimate.trace == pytest.approx(2.5, abs=1e-12)
    assert estimate.frobenius_norm == pytest.approx(math.sqrt(66.25), abs=1e-12)
    assert estimate.trace_stderr < 1e-12
    assert estimate.num_matvecs == 20


def test_deflated_rejects_bad_settings():
    with pytest.raises(ValueError, match="exactly one"):
        deflated_hutchinson(lambda vector: vector, 5, seed=0)
    with pytest.raises(ValueError, match="num_probes >= 3"):
        deflated_hutchinson(lambda vector: vector, 5, num_probes=2, seed=0)
    with pytest.raises(ValueError, match="max_probes must be at least"):
        deflated_hutchinson(lambda vector: vector, 5, target_rel_stderr=0.1, max_probes=10, seed=0)


def test_deflated_basis_across_blocks_is_exact():
    # 45 basis vectors fill one block of 32 and part of a second; spanning the space, they give
    # the trace to rounding.
    matrix = decaying_spectrum(45, seed=28)
    estimate = deflated_hutchinson(dense_matvec(matrix), 45, num_probes=100, seed=10)
    assert estimate.basis_size == 45
    assert estimate.trace == pytest.approx(float(torch.trace(matrix)), abs=1e-10)
    assert estimate.frobenius_norm == pytest.approx(float(torch.linalg.matrix_norm(matrix)), abs=1e-10)
    # The reported error is floored at rounding level, not the spread of zero-valued samples.
    assert 0 < estimate.trace_stderr < 1e-10


def test_deflated_regrowth_stays_within_budget():
    # On a flat spectrum the pilot's plan stops the basis early, so later rounds grow it again.
    # Every budget, small ones included, must be kept and leave probes for a standard error.
    matrix = symmetric_with_eigenvalues(np.linspace(-1.0, 2.5, 150), seed=29)
    for max_probes in (60, 75, 100, 160, 400):
        estimate = deflated_hutchinson(dense_matvec(matrix), 150, target_rel_stderr=0.001, max_probes=max_probes, seed=11)
        assert estimate.num_matvecs <= max_probes
        assert estimate.num_probes >= 2
        assert math.isfinite(estimate.trace_stderr)
