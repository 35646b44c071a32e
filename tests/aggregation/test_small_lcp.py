"""The plain-Python solver of few-variable LCPs (``jdoptim.linalg.small_lcp``) and the dual-cone
path built on it, against quadprog and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

import jdoptim.linalg.dual_cone as dual_cone
from jdoptim.linalg.dual_cone import solve_dual_cone, solve_upgrad_weights
from jdoptim.linalg.small_lcp import PLAIN_PYTHON_UP_TO, SmallLCP, cholesky
from tests.aggregation._reference_solvers import solve_dual_cone_quadprog


def _spd(m: int, seed: int, conflict: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((m, m + 3)) + conflict * rng.standard_normal((1, m + 3))
    return j @ j.T + 1e-3 * np.eye(m)


def _quadprog(matrix: np.ndarray, linear: np.ndarray) -> np.ndarray:
    m = matrix.shape[0]
    return quadprog.solve_qp(matrix, -linear, np.eye(m), np.zeros(m))[0]


@pytest.mark.parametrize("m", range(1, PLAIN_PYTHON_UP_TO + 1))
def test_cholesky_factor_reproduces_the_matrix(m):
    matrix = _spd(m, m)
    factor = cholesky(matrix.tolist())
    assert factor is not None
    lower = np.zeros((m, m))
    for i, row in enumerate(factor):
        lower[i, : i + 1] = row
    np.testing.assert_allclose(lower @ lower.T, matrix, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(lower, np.linalg.cholesky(matrix), rtol=1e-12, atol=1e-13)


def test_cholesky_refuses_what_is_not_positive_definite():
    assert cholesky([[1.0, 2.0], [2.0, 1.0]]) is None  # indefinite
    assert cholesky([[1.0, 1.0], [1.0, 1.0]]) is None  # singular: a zero pivot
    assert cholesky([[float("nan"), 0.0], [0.0, 1.0]]) is None
    assert cholesky([[0.0]]) is None


@pytest.mark.parametrize("m", [3, 5, 8])
@pytest.mark.parametrize("seed", range(8))
def test_solutions_match_quadprog_and_satisfy_the_kkt_conditions(m, seed):
    matrix = _spd(m, 100 * m + seed, conflict=seed / 2)
    rng = np.random.default_rng(seed)
    problems = SmallLCP(matrix.tolist())
    for linear in [rng.standard_normal(m), matrix[seed % m], -np.abs(rng.standard_normal(m))]:
        z = problems.solve(linear.tolist())
        assert z is not None
        z = np.array(z)
        np.testing.assert_allclose(z, _quadprog(matrix, linear), rtol=1e-8, atol=1e-10)
        y = matrix @ z + linear
        tol = 1e-9 * (np.abs(linear).max() + np.abs(matrix).max() * z.max())
        assert (z >= 0.0).all() and (y >= -tol).all()
        assert (np.abs(z * y) <= tol * (1.0 + z)).all()


def test_an_all_nonnegative_linear_term_gives_zero_at_once():
    problems = SmallLCP(_spd(4, 0).tolist())
    assert problems.solve([1.0, 0.0, 2.0, 3.0]) == [0.0, 0.0, 0.0, 0.0]


def test_declines_when_the_pivots_do_not_end():
    matrix = _spd(6, 3, conflict=1.0)
    problems = SmallLCP(matrix.tolist())
    problems.max_iter = 0
    assert problems.solve((-matrix[0]).tolist()) is None


def test_declines_a_free_set_that_is_not_positive_definite():
    """Only a matrix that is not positive definite has such a free set; the dual-cone path
    checks ``M`` first, and this is the guard behind that check."""
    problems = SmallLCP([[1.0, 2.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert problems.solve([-1.0, -1.0, 0.5]) is None


def _small_cases() -> list[torch.Tensor]:
    """Gramians of 3 … 8 rows: random, with a shared direction (agreement), with conflicts, of
    low rank, with parallel, anti-parallel and zero rows, and with wild scales."""
    gen = torch.Generator().manual_seed(11)
    cases = []
    for m in range(3, PLAIN_PYTHON_UP_TO + 1):
        j = torch.randn(m, 12, generator=gen, dtype=torch.float64)
        shared = torch.randn(1, 12, generator=gen, dtype=torch.float64)
        low_rank = torch.randn(m, 2, generator=gen, dtype=torch.float64) @ torch.randn(
            2, 12, generator=gen, dtype=torch.float64
        )
        special = j.clone()
        special[1] = -special[0]  # anti-parallel
        special[2] = 3.0 * special[0]  # parallel
        special[-1] = 0.0  # a zero gradient
        wild = j * torch.logspace(-4, 4, m, dtype=torch.float64)[:, None]
        cases += [j, j + 2.0 * shared, j - 0.5 * j.mean(0), low_rank, special, wild]
    return [j @ j.T for j in cases]


def _well_conditioned(g: torch.Tensor) -> bool:
    eigenvalues = torch.linalg.eigvalsh(g)
    return bool(eigenvalues[0] > 1e-8 * eigenvalues[-1])


@pytest.mark.parametrize("case", range(len(_small_cases())))
def test_upgrad_weights_of_a_few_losses_match_quadprog_without_arrays(case, monkeypatch):
    """UPGrad's weights for 3 … 8 losses come from the plain-Python path (the array solver is
    never called on these cases) and equal the array solver's (switched on again afterwards);
    where the Gramian is well conditioned, also the sum of quadprog's solutions of the ``m``
    problems ``v ≥ eᵢ/m`` (on the others quadprog's unequilibrated ridge swamps the small rows).
    The aggregated direction conflicts with no loss."""
    g = _small_cases()[case]
    m = g.shape[0]

    def refuse(*args, **kwargs):
        raise AssertionError("the array solver ran")

    with monkeypatch.context() as patch:
        patch.setattr(dual_cone, "solve_nonnegative_lcp", refuse)
        weights, info = solve_upgrad_weights(g, None)
    assert not info.degraded
    monkeypatch.setattr(dual_cone, "_solve_tiny", lambda *args: None)
    general, _ = solve_upgrad_weights(g, None)
    diff = weights - general
    scale = float(general @ g @ general) + float(g.diagonal().max())
    assert float(diff @ g @ diff) <= 1e-12 * scale
    if _well_conditioned(g):
        reference = solve_dual_cone_quadprog(g, torch.eye(m, dtype=torch.float64) / m).sum(0)
        torch.testing.assert_close(weights, general, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(weights, reference, rtol=1e-6, atol=1e-9)
    assert (g @ weights >= -1e-9 * float(g.abs().max()) * float(weights.abs().max())).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dual_cone_of_a_few_rows_agrees_with_the_array_solver(dtype, monkeypatch):
    """Signed random bounds (DualProj's and general projections), the plain-Python path against
    the array solver (the plain-Python path switched off), in float32 and float64."""
    gen = torch.Generator().manual_seed(5)
    for g in _small_cases():
        g = g.to(dtype)
        bounds = torch.randn(4, g.shape[0], generator=gen, dtype=torch.float64).to(dtype)
        fast, _ = solve_dual_cone(g, bounds)
        monkeypatch.setattr(dual_cone, "_solve_tiny", lambda *args: None)
        general, _ = solve_dual_cone(g, bounds)
        monkeypatch.undo()
        assert fast.dtype == dtype
        assert (fast >= bounds - 1e-6 * float(bounds.abs().max())).all()
        diff = (fast - general).double()
        scale = float((general.double() @ g.double() * general.double()).sum(1).max())
        scale += float(g.diagonal().max())
        assert float((diff @ g.double() * diff).sum(1).max()) <= 1e-9 * scale


def test_a_declined_problem_takes_the_array_solver(monkeypatch):
    """When the plain-Python solve declines one problem, the whole solve goes to the array
    solver and the result still matches quadprog."""
    g = _small_cases()[1]
    m = g.shape[0]
    monkeypatch.setattr(SmallLCP, "solve", lambda self, linear: None)
    calls = []
    original = dual_cone.solve_nonnegative_lcp

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dual_cone, "solve_nonnegative_lcp", counted)
    weights, info = solve_upgrad_weights(g, None)
    assert calls and not info.degraded
    reference = solve_dual_cone_quadprog(g, torch.eye(m, dtype=torch.float64) / m).sum(0)
    torch.testing.assert_close(weights, reference, rtol=1e-6, atol=1e-9)
