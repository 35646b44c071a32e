"""The batched torch LCP solver (float32 search, float64 solve and certificate), against
quadprog and against the KKT conditions computed here, independently of the solver."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

import jdoptim.linalg.batched_lcp as module
from jdoptim.linalg.batched_lcp import solve_lcp_batched


def _quadprog(matrix: np.ndarray, linear: np.ndarray) -> np.ndarray:
    m = matrix.shape[0]
    return np.stack([quadprog.solve_qp(matrix, -q, np.eye(m), np.zeros(m))[0] for q in linear])


def _random_pd(m: int, seed: int, condition: float = 1e-3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, m // 2 + 1))
    return a @ a.T / m + condition * np.eye(m)


def _kkt_violation(matrix: np.ndarray, linear: np.ndarray, z: np.ndarray) -> float:
    """Largest violation of ``z ≥ 0``, ``y = Mz + q ≥ 0``, ``zᵀy = 0`` (per row, relative)."""
    y = z @ matrix + linear
    scale = np.abs(linear).max(axis=1, keepdims=True) + np.abs(z).max(axis=1, keepdims=True)
    worst = np.maximum.reduce([np.maximum(-z, 0.0), np.maximum(-y, 0.0), np.abs(z * y)])
    return float((worst / scale).max())


def _solve(matrix: np.ndarray, linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z, certified = solve_lcp_batched(torch.from_numpy(matrix), torch.from_numpy(linear))
    assert z.dtype == torch.float64
    return z.numpy(), certified.numpy()


@pytest.mark.parametrize("m", [1, 3, 17, 70])
def test_matches_quadprog_and_satisfies_kkt(m):
    matrix = _random_pd(m, m)
    linear = np.random.default_rng(m).standard_normal((9, m))
    z, certified = _solve(matrix, linear)
    assert certified.all()
    assert _kkt_violation(matrix, linear, z) <= 1e-10
    np.testing.assert_allclose(z, _quadprog(matrix, linear), atol=1e-9, rtol=1e-7)


def test_upgrad_problems_where_the_float32_factorisation_fails():
    """UPGrad's problems (``Q = M``) for every sample twice, with a ridge float32 cannot see:
    the search's float32 systems are singular, those chunks are redone with the float64 matrix,
    and every problem is still certified; the solutions agree with quadprog's in ``M``'s norm
    (the norm of ``Jᵀz``; ``z`` itself is nearly undetermined between duplicates)."""
    base = _random_pd(20, 3)
    matrix = np.block([[base, base], [base, base]]) + 1e-9 * np.eye(40)
    assert torch.linalg.cholesky_ex(torch.from_numpy(matrix).float()).info != 0
    z, certified = _solve(matrix, matrix)
    assert certified.all()
    assert _kkt_violation(matrix, matrix, z) <= 1e-8
    rows = [0, 7, 25]
    error = z[rows] - _quadprog(matrix, matrix[rows])
    assert np.einsum("ki,ij,kj->k", error, matrix, error).max() <= 1e-12


@pytest.mark.parametrize("search_pivots", [0, 1, 100])
@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_any_search_length_and_chunk_size_give_the_same_solutions(
    search_pivots, chunk, monkeypatch
):
    """The search only proposes free sets: with none (pivoting from ``z = 0``), one pivot, or a
    full search, and with any chunking, the certified answer is the same."""
    monkeypatch.setattr(module, "_SEARCH_PIVOTS", search_pivots)
    monkeypatch.setattr(module, "CHUNK", chunk)
    matrix = _random_pd(30, 2)
    linear = np.random.default_rng(4).standard_normal((11, 30))
    z, certified = _solve(matrix, linear)
    assert certified.all()
    np.testing.assert_allclose(z, _quadprog(matrix, linear), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("factored_pivots", [0, 12])
def test_pivoting_from_an_arbitrary_free_set(factored_pivots, monkeypatch):
    """Kim & Park's rule terminates from any start: a random (mostly wrong) proposal of the
    search is corrected, by float32 then float64 pivots or by float64 pivots alone."""
    rng = np.random.default_rng(8)
    monkeypatch.setattr(module, "_FACTORED_PIVOTS", factored_pivots)
    monkeypatch.setattr(
        module, "_search", lambda m, q, tol: torch.from_numpy(rng.random(tuple(q.shape)) < 0.5)
    )
    matrix = _random_pd(25, 8)
    linear = rng.standard_normal((6, 25))
    z, certified = _solve(matrix, linear)
    assert certified.all()
    np.testing.assert_allclose(z, _quadprog(matrix, linear), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_first_solve_with_any_number_of_refinement_steps(steps, monkeypatch):
    """The first float64 solve factors in float32 and refines: with no refinement the float32
    accuracy fails the certificate and the pivots that follow redo those problems in float64;
    the answer is the same in every case."""
    monkeypatch.setattr(module, "_REFINEMENT_STEPS", steps)
    matrix = _random_pd(40, 9, condition=1e-2)
    linear = np.random.default_rng(9).standard_normal((8, 40))
    z, certified = _solve(matrix, linear)
    assert certified.all()
    np.testing.assert_allclose(z, _quadprog(matrix, linear), atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("steps", [0, 2, 50])
def test_search_with_any_number_of_conjugate_gradient_steps(steps, monkeypatch):
    monkeypatch.setattr(module, "_CG_STEPS", steps)
    matrix = _random_pd(40, 10)
    linear = np.random.default_rng(10).standard_normal((8, 40))
    z, certified = _solve(matrix, linear)
    assert certified.all()
    np.testing.assert_allclose(z, _quadprog(matrix, linear), atol=1e-9, rtol=1e-7)


def test_unfinished_problems_are_reported_uncertified(monkeypatch):
    monkeypatch.setattr(module, "_SEARCH_PIVOTS", 0)
    monkeypatch.setattr(module, "_FACTORED_PIVOTS", 0)
    matrix = _random_pd(12, 3)
    linear = -np.abs(np.random.default_rng(3).standard_normal((4, 12)))  # z = 0 is infeasible
    _, certified = solve_lcp_batched(torch.from_numpy(matrix), torch.from_numpy(linear), max_iter=0)
    assert not certified.any()


def test_certificate_rejects_a_perturbed_solution():
    matrix = _random_pd(20, 6)
    linear = np.random.default_rng(6).standard_normal((5, 20))
    z, _ = _solve(matrix, linear)
    scale = torch.from_numpy(np.abs(linear).max(axis=1))
    m_t, q_t = torch.from_numpy(matrix), torch.from_numpy(linear)
    assert module.certify(m_t, q_t, torch.from_numpy(z.copy()), scale).all()
    wrong = torch.from_numpy(z.copy())
    wrong[:, :] += 1e-6 * (wrong > 0)  # off the optimum on every free variable
    assert not module.certify(m_t, q_t, wrong, scale).any()


def test_free_set_products_and_solves_by_parts() -> None:
    """The refined solve's pieces against dense algebra: the residual product read off the whole
    matrix equals the padded free-set systems' product (identity rows at the padding), and the
    two triangular solves equal ``torch.cholesky_solve``."""
    torch.manual_seed(0)
    m, k, size = 9, 4, 6
    a = torch.randn(m, m + 3, dtype=torch.float64)
    matrix = a @ a.T
    free = torch.rand(k, m) < 0.5
    free[:, 0] = True
    index = torch.argsort((~free).to(torch.uint8), dim=1, stable=True)[:, :size]
    valid = torch.gather(free, 1, index)
    assert not bool(valid.all())  # (some padding)
    systems = module._systems(matrix, index, valid)
    x = torch.randn(k, size, 1, dtype=torch.float64)
    torch.testing.assert_close(module._free_product(matrix, index, valid, x), systems @ x)
    factor = torch.linalg.cholesky(systems)
    rhs = torch.randn(k, size, 2, dtype=torch.float64)
    torch.testing.assert_close(
        module._cholesky_solve(factor, rhs), torch.cholesky_solve(rhs, factor)
    )
