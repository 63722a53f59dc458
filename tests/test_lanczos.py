import numpy as np
import pytest
import torch

from stabcheck.engine.lanczos import lanczos


def random_symmetric(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(size, size, generator=generator, dtype=torch.float64)
    return (matrix + matrix.T) / 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extremes_match_eigvalsh(seed):
    matrix = random_symmetric(120, seed)
    reference = torch.linalg.eigvalsh(matrix).numpy()
    result = lanczos(lambda v: matrix @ v, 120, num_top=3, num_bottom=2, max_iter=120, tol=1e-12)
    assert result.converged
    np.testing.assert_allclose(result.top, reference[::-1][:3], rtol=1e-10)
    np.testing.assert_allclose(result.bottom, reference[:2], rtol=1e-10)


def test_residual_bounds_the_error():
    matrix = random_symmetric(200, 3)
    reference = torch.linalg.eigvalsh(matrix).numpy()
    result = lanczos(lambda v: matrix @ v, 200, num_top=1, num_bottom=0, max_iter=15, tol=1e-14)
    assert not result.converged
    # Some eigenvalue lies within the residual of each Ritz value.
    for value, residual in zip(result.ritz_values, result.residuals):
        assert np.min(np.abs(reference - value)) <= residual * (1 + 1e-9) + 1e-12


def test_unconverged_top_is_a_lower_bound():
    matrix = random_symmetric(300, 4)
    top = float(torch.linalg.eigvalsh(matrix)[-1])
    result = lanczos(lambda v: matrix @ v, 300, num_top=1, num_bottom=1, max_iter=8, tol=1e-10)
    assert not result.converged
    assert result.top[0] <= top + 1e-12
    assert not result.top_converged[0]


def test_invariant_subspace_is_exact():
    diagonal = torch.tensor([5.0, 5.0, 5.0, -1.0, -1.0, 2.0], dtype=torch.float64)
    result = lanczos(lambda v: diagonal * v, 6, num_top=2, num_bottom=1, max_iter=6, tol=1e-12)
    assert result.invariant_subspace
    assert result.converged
    # Three distinct eigenvalues span the Krylov space; repeated ones appear once.
    assert result.iterations == 3
    np.testing.assert_allclose(sorted(result.ritz_values), [-1.0, 2.0, 5.0], atol=1e-12)


def test_same_seed_same_result_and_other_seed_differs():
    matrix = random_symmetric(80, 5)
    first = lanczos(lambda v: matrix @ v, 80, num_top=2, max_iter=10, tol=1e-14, seed=7)
    second = lanczos(lambda v: matrix @ v, 80, num_top=2, max_iter=10, tol=1e-14, seed=7)
    other = lanczos(lambda v: matrix @ v, 80, num_top=2, max_iter=10, tol=1e-14, seed=8)
    assert np.array_equal(first.ritz_values, second.ritz_values)
    assert not np.array_equal(first.ritz_values, other.ritz_values)


def test_matvec_count_matches_iterations():
    matrix = random_symmetric(50, 6)
    calls = []

    def matvec(v):
        calls.append(1)
        return matrix @ v

    result = lanczos(matvec, 50, num_top=1, num_bottom=1, max_iter=50, tol=1e-8)
    # One product per step, plus one per requested Ritz pair for the explicit residual.
    assert result.num_matvecs == len(calls)
    assert result.num_matvecs == result.iterations + 2


def test_explicit_residuals_see_a_noisy_operator():
    matrix = random_symmetric(60, 7)
    generator = torch.Generator().manual_seed(0)

    def noisy(v):
        return matrix @ v + 1e-3 * torch.randn(60, generator=generator, dtype=torch.float64)

    result = lanczos(noisy, 60, num_top=1, num_bottom=0, max_iter=60, tol=1e-8)
    # The Lanczos estimate cannot see the noise in the products; the recomputed residual does.
    assert result.top_residuals[0] > 1e-4
    assert not result.converged


def test_rejects_empty_request():
    with pytest.raises(ValueError):
        lanczos(lambda v: v, 4, num_top=0, num_bottom=0)
