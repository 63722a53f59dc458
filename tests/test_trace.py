"""Hutchinson and Hutch++ trace estimates against exact traces of dense matrices and zoo Hessians."""

import math

import numpy as np
import pytest
import torch
from cases import dense_hessian, make_case

from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.trace import MIN_SEQUENTIAL_PROBES, hutch_plus_plus, hutchinson


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
