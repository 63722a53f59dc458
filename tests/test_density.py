"""Stochastic Lanczos quadrature against matrices with known spectra and a zoo Hessian."""

import numpy as np
import pytest
import torch
from cases import dense_hessian, make_case

from stabcheck.engine.density import spectral_density
from stabcheck.engine.hvp import HessianOperator
from stabcheck.engine.objective import Objective, builtin_loss
from stabcheck.engine.trace import hutchinson

EIGENVALUES = np.concatenate([np.linspace(-2.0, 1.0, 30), np.linspace(4.0, 6.0, 10)])


def known_spectrum_matrix(seed=0):
    """Return a 40 x 40 symmetric matrix with eigenvalues EIGENVALUES."""
    generator = torch.Generator().manual_seed(seed)
    orthogonal, _ = torch.linalg.qr(torch.randn(40, 40, generator=generator, dtype=torch.float64))
    return orthogonal @ torch.diag(torch.from_numpy(EIGENVALUES)) @ orthogonal.T


def recording_matvec(matrix, inputs):
    """Return a product A v that also stores each input v, to recover the probes afterwards."""

    def matvec(vector):
        inputs.append(vector.clone())
        return matrix @ vector

    return matvec


def trapezoid(values, grid):
    # np.trapezoid needs numpy >= 2.0 and numpy 2.4 has no np.trapz, so integrate by hand.
    return float(np.sum((values[1:] + values[:-1]) * np.diff(grid)) / 2)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_slq_nodes_are_eigenvalues_at_full_steps(probes):
    matrix = known_spectrum_matrix()
    density = spectral_density(lambda vector: matrix @ vector, 40, num_probes=3, num_steps=40, probes=probes, seed=1)
    for nodes in density.nodes:
        np.testing.assert_allclose(nodes, EIGENVALUES, atol=1e-9)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_slq_weights_sum_to_one(probes):
    matrix = known_spectrum_matrix()
    density = spectral_density(lambda vector: matrix @ vector, 40, num_probes=3, num_steps=12, probes=probes, seed=2)
    for weights in density.weights:
        assert np.sum(weights) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("probes", ["rademacher", "gaussian"])
def test_slq_first_moment_is_rayleigh_quotient(probes):
    matrix = known_spectrum_matrix()
    inputs = []
    density = spectral_density(recording_matvec(matrix, inputs), 40, num_probes=3, num_steps=40, probes=probes, seed=3)
    assert density.num_matvecs == 3 * 40
    assert len(inputs) == 3 * 40
    for index in range(3):
        # The first product of each probe's Lanczos run is on the unit probe itself.
        probe = inputs[index * 40]
        rayleigh = float(probe @ matrix @ probe / (probe @ probe))
        first_moment = float(np.sum(density.weights[index] * density.nodes[index]))
        assert first_moment == pytest.approx(rayleigh, abs=1e-12)


def test_slq_second_moment_is_exact_per_probe():
    matrix = known_spectrum_matrix()
    inputs = []
    density = spectral_density(recording_matvec(matrix, inputs), 40, num_probes=1, num_steps=5, seed=4)
    probe = inputs[0]
    # Five Lanczos steps integrate polynomials up to degree 9 exactly, so q^T A^2 q is exact.
    expected = float(probe @ matrix @ matrix @ probe / (probe @ probe))
    assert density.moment(2) == pytest.approx(expected, rel=1e-12)


def test_slq_broadened_density_integrates_to_one():
    matrix = known_spectrum_matrix()
    density = spectral_density(lambda vector: matrix @ vector, 40, num_probes=4, num_steps=20, seed=5)
    grid, sigma = density.default_grid()
    values = density.broadened(grid, sigma)
    assert np.all(values >= 0)
    assert trapezoid(values, grid) == pytest.approx(1.0, abs=1e-3)


def test_slq_default_grid_covers_nodes():
    matrix = known_spectrum_matrix()
    density = spectral_density(lambda vector: matrix @ vector, 40, num_probes=2, num_steps=40, seed=6)
    grid, sigma = density.default_grid(num_points=500)
    assert sigma == pytest.approx(0.01 * (EIGENVALUES.max() - EIGENVALUES.min()), rel=1e-9)
    assert grid[0] < EIGENVALUES.min()
    assert grid[-1] > EIGENVALUES.max()
    assert grid.size == 500


def test_slq_trace_matches_hutchinson_same_seed():
    matrix = known_spectrum_matrix()
    density = spectral_density(lambda vector: matrix @ vector, 40, num_probes=6, num_steps=10, seed=7)
    estimate = hutchinson(lambda vector: matrix @ vector, 40, num_probes=6, seed=7)
    assert density.trace() == pytest.approx(estimate.trace, rel=1e-12)


def test_slq_zoo_hessian_trace_and_range():
    case = make_case("mlp")
    objective = Objective(case.model, case.inputs, case.targets, builtin_loss(case.loss), dtype=torch.float64)
    operator = HessianOperator(objective)
    dense = dense_hessian(case.model, case.inputs, case.targets, case.loss)
    eigenvalues = torch.linalg.eigvalsh(dense).numpy()
    density = spectral_density(operator.matvec, operator.dim, num_probes=20, num_steps=operator.dim, seed=8)
    reference = hutchinson(operator.matvec, operator.dim, num_probes=20, seed=8)
    all_nodes = np.concatenate(density.nodes)
    scale = np.abs(eigenvalues).max()
    assert operator.num_matvecs == density.num_matvecs + 20
    assert all_nodes.max() == pytest.approx(eigenvalues.max(), rel=1e-8)
    assert all_nodes.min() >= eigenvalues.min() - 1e-8 * scale
    # The same probes give the same trace as Hutchinson, which lies within 3 standard errors.
    assert abs(density.trace() - float(torch.trace(dense))) <= 3 * reference.trace_stderr
