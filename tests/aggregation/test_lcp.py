"""The batched LCP solver (block principal pivoting, and the principal pivot transform for
problems that share their first free set), against quadprog."""

from __future__ import annotations

import numpy as np
import pytest
import quadprog

import jdoptim.linalg.lcp as module
from jdoptim.linalg.lcp import solve_nonnegative_lcp


def _quadprog(matrix: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """``argmin_{z ≥ 0} ½ zᵀ M z + qᵀ z`` for each row ``q`` of ``linear``, one by one."""
    m = matrix.shape[0]
    return np.stack([quadprog.solve_qp(matrix, -q, np.eye(m), np.zeros(m))[0] for q in linear])


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


@pytest.mark.parametrize("m", [5, 40])
def test_lcp_with_shared_free_sets_matches_quadprog(m):
    """Problems sharing their free sets (each distinct set is factored once above 24 variables):
    repeated and positively rescaled rows of ``Q`` among distinct ones."""
    matrix = _random_pd(m, 11 * m)
    base = np.random.default_rng(m).standard_normal((3, m))
    linear = np.concatenate([base, base * 2.0, base[:1] * 0.5, base[1:2], base[2:] * 3.0])
    z, certified = solve_nonnegative_lcp(matrix, linear)
    assert certified.all()
    for row in range(linear.shape[0]):
        expected = quadprog.solve_qp(matrix, -linear[row], np.eye(m), np.zeros(m))[0]
        np.testing.assert_allclose(z[row], expected, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("unguarded", [0, 1, 5])
@pytest.mark.parametrize("m", [6, 30])
def test_lcp_with_and_without_the_unguarded_first_pivots(m, unguarded, monkeypatch):
    """The anti-cycling bookkeeping from the first pivot on, or after 1 or 5 unguarded ones,
    gives quadprog's solutions, on a well- and a near-singular matrix."""
    monkeypatch.setattr(module, "_UNGUARDED_PIVOTS", unguarded)
    rng = np.random.default_rng(m + unguarded)
    for condition in (1e-1, 1e-7):
        a = rng.standard_normal((m, m // 2))
        matrix = a @ a.T / m + condition * np.eye(m)
        linear = rng.standard_normal((9, m))
        z, certified = solve_nonnegative_lcp(matrix, linear)
        if condition > 1e-3:
            assert certified.all()
        # Near-singular problems may exhaust the pivots; those rows are reported uncertified
        # (solve_dual_cone re-solves them with quadprog), and every certified row is exact.
        for row in np.flatnonzero(certified):
            expected = quadprog.solve_qp(matrix, -linear[row], np.eye(m), np.zeros(m))[0]
            tol = 1e-6 * max(1.0, float(np.abs(expected).max()))
            np.testing.assert_allclose(z[row], expected, atol=tol, rtol=1e-6)


def test_uncertified_problems_are_reported():
    matrix = _random_pd(12, 3)
    linear = -np.abs(np.random.default_rng(3).standard_normal((4, 12)))  # z = 0 is infeasible
    _, certified = solve_nonnegative_lcp(matrix, linear, max_iter=0)
    assert not certified.any()


def _clustered_upgrad_problem(m: int, seed: int) -> np.ndarray:
    """The equilibrated Gramian of ``m`` gradients in two conflicting clusters, as UPGrad meets it
    on per-sample losses: problems of a cluster mostly free the same rows first."""
    rng = np.random.default_rng(seed)
    center = rng.standard_normal(3 * m)
    other = -0.5 * center + rng.standard_normal(3 * m)
    rows = np.stack([center if i % 2 else other for i in range(m)])
    rows = rows + 1.5 * rng.standard_normal(rows.shape)
    gramian = rows @ rows.T
    scale = 1.0 / np.sqrt(np.diag(gramian))
    return gramian * scale[:, None] * scale[None, :] + 1e-10 * np.eye(m)


@pytest.mark.parametrize(("m", "seed"), [(40, 2), (40, 4), (64, 1)])
def test_problems_sharing_their_first_free_set_go_through_the_transform(m, seed, monkeypatch):
    """UPGrad's problems (``Q = M``) on two conflicting clusters: one transform per distinct first
    free set, the later pivots both release and add variables there, and every solution is
    quadprog's without a direct re-solve."""
    matrix = _clustered_upgrad_problem(m, seed)
    first = matrix < 0.0  # the first pivot frees {i : qᵢ < 0}
    n_sets = len(np.unique(first, axis=0))
    assert 2 * n_sets <= m  # shared enough for the transform
    built, direct = [], []
    original, original_direct = module._pivot_transform, module._solve_directly
    monkeypatch.setattr(
        module, "_pivot_transform", lambda *args: built.append(1) or original(*args)
    )
    monkeypatch.setattr(
        module, "_solve_directly", lambda *args: direct.append(1) or original_direct(*args)
    )
    z, certified = solve_nonnegative_lcp(matrix, matrix)
    assert certified.all()
    assert len(built) == n_sets and not direct
    np.testing.assert_allclose(z, _quadprog(matrix, matrix), atol=1e-9, rtol=1e-7)
    final = z > 0.0
    assert (first & ~final).any() and (~first & final).any()


def test_pivot_transform_exchanges_the_roles_of_z_and_y_on_the_base_set():
    """By definition: for any ``x = (y_F, z_B)``, ``w = P x + q̂`` is ``(z_F, y_B)`` of the
    point ``z`` where ``y = M z + q``."""
    rng = np.random.default_rng(0)
    m = 9
    matrix = _random_pd(m, 5)
    linear = rng.standard_normal((3, m))
    base = np.zeros(m, dtype=bool)
    base[[1, 4, 5, 8]] = True
    transform, start = module._pivot_transform(matrix, linear, base)
    for q, q_hat in zip(linear, start, strict=True):
        z_bound, y_free = rng.standard_normal(m), rng.standard_normal(m)
        x = np.where(base, y_free, z_bound)
        w = transform @ x + q_hat
        z = np.where(base, w, z_bound)
        y = matrix @ z + q
        np.testing.assert_allclose(y[base], y_free[base], atol=1e-12)
        np.testing.assert_allclose(y[~base], w[~base], atol=1e-12)


def test_a_failed_certificate_after_the_transform_is_solved_again_directly(monkeypatch):
    """A corrupted transform (as a badly conditioned ``M_FF`` would give) leaves problems
    uncertified; they are re-solved on ``M`` itself and come out exact."""
    matrix = _clustered_upgrad_problem(40, seed=1)
    original = module._pivot_transform

    def corrupted(*args):
        transform, start = original(*args)
        return transform, start + 0.3

    monkeypatch.setattr(module, "_pivot_transform", corrupted)
    z, certified = solve_nonnegative_lcp(matrix, matrix)
    assert certified.all()
    np.testing.assert_allclose(z, _quadprog(matrix, matrix), atol=1e-9, rtol=1e-7)


def test_groups_with_an_empty_first_free_set_and_mixed_groups():
    """Problems already solved at ``z = 0`` (``q ≥ 0``) form a group whose base set is empty,
    next to shared groups and to problems of their own."""
    m = 30
    matrix = _random_pd(m, 3)
    rng = np.random.default_rng(4)
    shared = rng.standard_normal((2, m))
    solved_at_zero = np.abs(rng.standard_normal((3, m)))
    alone = rng.standard_normal((1, m))
    linear = np.concatenate([solved_at_zero, shared, 2.0 * shared, 0.5 * shared, alone])
    z, certified = solve_nonnegative_lcp(matrix, linear)
    assert certified.all()
    np.testing.assert_allclose(z, _quadprog(matrix, linear), atol=1e-9, rtol=1e-7)
    assert (z[:3] == 0.0).all()


def test_gathered_systems_of_mixed_sizes_are_solved_at_their_own_size(monkeypatch):
    """Free sets of 1 to 30 variables among 40 (split into size groups, recursively) give, row by
    row, ``x_F = -A_FF⁻¹ q_F`` with ``A`` the row's own matrix, as one ``numpy.linalg.solve`` per
    row computes it."""
    m, k = 40, 24
    rng = np.random.default_rng(7)
    matrices = np.stack([_random_pd(m, seed) for seed in (1, 2, 3)])
    which = rng.integers(0, 3, k)
    linear = rng.standard_normal((k, m))
    sizes = np.concatenate([[0, 1, 2, 30], rng.integers(1, 31, k - 4)])
    free = np.zeros((k, m), dtype=bool)
    for row, size in enumerate(sizes):
        free[row, rng.choice(m, size, replace=False)] = True
    solve_group = module._solve_gathered
    groups = []

    def counted(*args, **kwargs):
        groups.append(int(args[3].sum(axis=1).max()))  # the group's largest free set
        return solve_group(*args, **kwargs)

    monkeypatch.setattr(module, "_solve_gathered", counted)
    x = solve_group(matrices, which, linear, free)
    assert len(groups) >= 4 and min(groups) <= 8  # split twice at least, down to small groups
    for row in range(k):
        expected = np.zeros(m)
        f = np.flatnonzero(free[row])
        if f.size:
            a = matrices[which[row]][np.ix_(f, f)]
            expected[f] = -np.linalg.solve(a, linear[row, f])
        np.testing.assert_allclose(x[row], expected, atol=1e-10, rtol=1e-9)
