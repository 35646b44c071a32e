"""The batched exact solver behind UPGrad and DualProj, against quadprog and cvxpy."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

from jdoptim.aggregation._dual_cone import (
    equilibrate,
    solve_dual_cone,
    solve_dual_cone_quadprog,
    solve_nonnegative_lcp,
)


def _random_pd(m: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, 2 * m))
    return a @ a.T / m + 1e-3 * np.eye(m)


@pytest.mark.parametrize("m", [1, 2, 5, 17, 40])
def test_lcp_solutions_match_quadprog(m):
    matrix = _random_pd(m, m)
    linear = np.random.default_rng(100 + m).standard_normal((7, m))
    z, certified = solve_nonnegative_lcp(matrix, linear)
    assert certified.all()
    for row in range(7):
        expected = quadprog.solve_qp(matrix, -linear[row], np.eye(m), np.zeros(m))[0]
        np.testing.assert_allclose(z[row], expected, atol=1e-10, rtol=1e-8)


def test_uncertified_problems_are_reported():
    matrix = _random_pd(12, 3)
    linear = -np.abs(np.random.default_rng(3).standard_normal((4, 12)))  # z = 0 is infeasible
    _, certified = solve_nonnegative_lcp(matrix, linear, max_iter=0)
    assert not certified.any()


def test_fallback_gives_the_same_solution(monkeypatch):
    j = torch.randn(9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = j @ j.T
    bounds = torch.eye(9, dtype=torch.float64) / 9
    fast, info = solve_dual_cone(g, bounds)
    assert info.n_fallbacks == 0

    import jdoptim.aggregation._dual_cone as module

    original = module.solve_nonnegative_lcp
    monkeypatch.setattr(
        module, "solve_nonnegative_lcp", lambda mat, lin: original(mat, lin, max_iter=0)
    )
    slow, info = solve_dual_cone(g, bounds)
    assert info.n_fallbacks > 0 and info.degraded
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-8)


def test_equilibration_gives_unit_diagonal_and_keeps_zero_rows():
    j = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    j[2] = 0.0
    j[0] *= 1e6
    g = (j @ j.T).numpy()
    equilibrated, scale = equilibrate(g)
    np.testing.assert_allclose(np.diag(equilibrated)[[0, 1, 3]], 1.0)
    assert equilibrated[2].max() == 0.0
    np.testing.assert_allclose(equilibrated, g * np.outer(scale, scale))


@pytest.mark.parametrize("m", [3, 10, 25])
def test_fast_solver_agrees_with_quadprog_reference(m):
    j = torch.randn(m, 2 * m, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    g = j @ j.T
    rng = np.random.default_rng(m)
    bounds = torch.from_numpy(rng.standard_normal((5, m)))
    fast, _ = solve_dual_cone(g, bounds)
    reference = solve_dual_cone_quadprog(g, bounds)
    # Both solve a regularised problem (different ridges): compare the projections Jᵀv.
    torch.testing.assert_close(fast @ j, reference @ j, atol=1e-7, rtol=1e-7)
    # Primal feasibility of the bounds.
    assert (fast >= bounds - 1e-12).all()


def test_reg_eps_must_be_positive():
    with pytest.raises(ValueError, match="reg_eps"):
        solve_dual_cone(torch.eye(2), torch.eye(2), reg_eps=0.0)
