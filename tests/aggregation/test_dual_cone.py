"""The batched exact solver behind UPGrad and DualProj, against quadprog and cvxpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jdoptim.linalg.dual_cone as module
from jdoptim.linalg.dual_cone import solve_dual_cone, solve_upgrad_weights
from jdoptim.linalg.equilibration import equilibrate
from tests.aggregation._reference_solvers import solve_dual_cone_quadprog


def test_fallback_gives_the_same_solution(monkeypatch):
    j = torch.randn(9, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g = j @ j.T
    bounds = torch.eye(9, dtype=torch.float64) / 9
    fast, info = solve_dual_cone(g, bounds)
    assert info.n_fallbacks == 0

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


def _tiny_cases() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Gramians of 1 or 2 rows: random, conflicting, anti-parallel, parallel, a zero row, wild
    scales; with UPGrad's bounds (``diag(1/m)``) and random signed ones."""
    gen = torch.Generator().manual_seed(7)
    jacobians = [torch.randn(m, 5, generator=gen, dtype=torch.float64) for m in (1, 2) * 6]
    base = torch.randn(5, generator=gen, dtype=torch.float64)
    jacobians += [
        torch.stack([base, -base]),  # anti-parallel: the projection is 0
        torch.stack([base, 3.0 * base]),  # parallel
        torch.stack([base, torch.zeros(5, dtype=torch.float64)]),  # a zero gradient
        torch.stack([1e4 * base, 1e-4 * torch.randn(5, generator=gen, dtype=torch.float64)]),
        torch.stack([base, -base + 0.1 * torch.randn(5, generator=gen, dtype=torch.float64)]),
    ]
    cases = []
    for j in jacobians:
        m = j.shape[0]
        g = j @ j.T
        cases.append((g, torch.eye(m, dtype=torch.float64) / m))
        cases.append((g, torch.randn(3, m, generator=gen, dtype=torch.float64)))
    return cases


def _g_distance(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> float:
    """``max_k (a_k - b_k)ᵀ G (a_k - b_k)``: how far apart the projections ``Jᵀa_k``, ``Jᵀb_k``
    are."""
    diff = (a - b).double()
    return float((diff @ g.double() * diff).sum(1).max())


def _well_conditioned(g: torch.Tensor) -> bool:
    eigenvalues = torch.linalg.eigvalsh(g.double())
    return bool(eigenvalues[0] > 1e-8 * eigenvalues[-1])


@pytest.mark.parametrize("case", range(len(_tiny_cases())))
def test_one_or_two_losses_take_the_plain_python_path_and_match_quadprog(case, monkeypatch):
    g, bounds = _tiny_cases()[case]

    def refuse(*args, **kwargs):
        raise AssertionError("the general solver ran for m <= 2")

    monkeypatch.setattr(module, "solve_nonnegative_lcp", refuse)
    fast, info = solve_dual_cone(g, bounds)
    assert not info.degraded
    assert (fast >= bounds - 1e-12).all()
    if not _well_conditioned(g):
        return  # many optimal v, and quadprog's unequilibrated ridge swamps the small row
    reference = solve_dual_cone_quadprog(g, bounds)
    scale = float((reference @ g * reference).sum(1).max()) + float(g.diagonal().max())
    assert _g_distance(fast, reference, g) <= 1e-12 * scale
    # Optimality: the multipliers y = G v are non-negative and vanish where v is above its bound.
    y = fast @ g
    tol = 1e-6 * (float(g.abs().max()) * float(fast.abs().max()) + 1e-300)
    assert (y >= -tol).all()
    assert (torch.where(fast > bounds + 1e-9, y.abs(), torch.zeros_like(y)) <= tol).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiny_path_agrees_with_the_general_solver(dtype, monkeypatch):
    for g, bounds in _tiny_cases():
        g, bounds = g.to(dtype), bounds.to(dtype)
        fast, _ = solve_dual_cone(g, bounds)
        monkeypatch.setattr(module, "_solve_tiny", lambda *args: None)
        general, _ = solve_dual_cone(g, bounds)
        monkeypatch.undo()
        assert fast.dtype == dtype
        scale = float((general @ g * general).sum(1).max()) + float(g.diagonal().max())
        tol = 1e-9  # the ridge (1e-10 … m·eps(float32)) bounds how exact either solve is
        assert _g_distance(fast, general, g) <= tol * scale
        if _well_conditioned(g):  # a unique solution: the weights themselves agree
            torch.testing.assert_close(
                fast, general, atol=1e-5 * float(general.abs().max()), rtol=1e-5
            )


@pytest.mark.parametrize("m", [1, 2, 3, 8, 30])
@pytest.mark.parametrize("preference", ["default", "uniform", "random", "with_zeros"])
def test_upgrad_weights_are_the_sum_of_the_diagonal_problems(m, preference):
    """The UPGrad shortcut (bounds ``eᵢ`` scaled back by ``pᵢ``; plain Python for ``m ≤ 2``)
    equals summing the solutions of the ``m`` problems ``v ≥ pᵢeᵢ`` solved one by one with
    quadprog. ``None`` (the default) is the uniform preference ``1/m``."""
    gen = torch.Generator().manual_seed(m)
    j = torch.randn(m, 2 * m, generator=gen, dtype=torch.float64)
    j[:, 0] += 2.0  # some agreement, some conflict
    g = j @ j.T
    p = {
        "default": torch.full((m,), 1.0 / m, dtype=torch.float64),
        "uniform": torch.full((m,), 1.0 / m, dtype=torch.float64),
        "random": torch.rand(m, generator=gen, dtype=torch.float64),
        "with_zeros": torch.rand(m, generator=gen, dtype=torch.float64) * (torch.arange(m) % 3 > 0),
    }[preference]
    weights, info = solve_upgrad_weights(g, None if preference == "default" else p)
    assert not info.degraded
    reference = solve_dual_cone_quadprog(g, torch.diag(p)).sum(0)
    torch.testing.assert_close(weights @ j, reference @ j, atol=1e-7, rtol=1e-7)
    assert (j @ (weights @ j) >= -1e-8).all()  # the aggregated direction conflicts with no row


@pytest.mark.parametrize("m", [1, 2])
def test_upgrad_weights_of_one_or_two_losses_off_the_plain_python_path(m, monkeypatch):
    """When the plain-Python solve declines, UPGrad's weights come from the general path and
    still equal summing quadprog's solutions."""
    monkeypatch.setattr(module, "_solve_tiny", lambda *args: None)
    gen = torch.Generator().manual_seed(20 + m)
    j = torch.randn(m, 4, generator=gen, dtype=torch.float64)
    if m == 2:
        j[1] = -0.5 * j[0] + 0.3 * torch.randn(4, generator=gen, dtype=torch.float64)  # conflict
    g = j @ j.T
    p = torch.full((m,), 1.0 / m, dtype=torch.float64)
    weights, info = solve_upgrad_weights(g, p)
    assert not info.degraded
    reference = solve_dual_cone_quadprog(g, torch.diag(p)).sum(0)
    torch.testing.assert_close(weights @ j, reference @ j, atol=1e-7, rtol=1e-7)
