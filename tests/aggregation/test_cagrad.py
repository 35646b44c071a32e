"""CAGrad: against the primal problem solved by cvxpy on J, closed forms, properties."""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import pytest
import torch

from jdoptim.aggregation import CAGrad, CAGradWeighting
from tests.aggregation.matrices import MATRIX_IDS, MATRIX_VALUES, full_rank


def _primal(jacobian: torch.Tensor, c: float) -> tuple[np.ndarray, float]:
    """max_d min_i gᵢᵀd s.t. ‖d − g₀‖ ≤ c‖g₀‖ (cvxpy, Clarabel): returns (d, optimal value)."""
    j = jacobian.numpy()
    g0 = j.mean(axis=0)
    d, t = cp.Variable(j.shape[1]), cp.Variable()
    problem = cp.Problem(cp.Maximize(t), [j @ d >= t, cp.norm(d - g0) <= c * np.linalg.norm(g0)])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return np.asarray(d.value), float(t.value)


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
@pytest.mark.parametrize("c", [0.4, 0.8])
def test_solves_the_primal_problem(matrix, c):
    d = CAGrad(c=c, rescale=0)(matrix).numpy()
    j = matrix.numpy()
    g0 = j.mean(axis=0)
    expected_d, expected_value = _primal(matrix, c)
    scale = float(np.abs(j).max()) * np.linalg.norm(g0)
    # Feasible and optimal (the optimal value is unique even when the maximiser is not).
    assert np.linalg.norm(d - g0) <= c * np.linalg.norm(g0) * (1 + 1e-8)
    assert abs((j @ d).min() - expected_value) <= 1e-6 * scale
    if not (j == 0).all(axis=1).any():  # with a zero gradient the maximiser is not unique
        assert np.abs(d - expected_d).max() <= 1e-5 * np.abs(expected_d).max()


def test_closed_forms():
    c = 0.4
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    # Identical gradients and m = 1: d = g + c g = (1 + c) g, rescaled by 1 + c².
    torch.testing.assert_close(CAGrad()(torch.stack([g, g])), (1 + c) / (1 + c**2) * g)
    torch.testing.assert_close(CAGrad()(g.unsqueeze(0)), (1 + c) / (1 + c**2) * g)
    # g and -3g: g₀ = -g, min(gᵀd, -3gᵀd) = gᵀd < 0 on the ball: d = -g + c g.
    torch.testing.assert_close(CAGrad()(torch.stack([g, -3.0 * g])), -(1 - c) / (1 + c**2) * g)
    # Two opposite gradients of equal norm: g₀ = 0, d = 0.
    torch.testing.assert_close(CAGrad()(torch.stack([g, -g])), torch.zeros(3, dtype=torch.float64))
    # Two orthogonal gradients of equal norm: by symmetry d = (1 + c) g₀.
    ortho = torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(CAGrad(rescale=0)(ortho), (1 + c) * ortho.mean(dim=0))


def test_rescale_modes_and_c_zero():
    j = full_rank(4, 7, seed=40)
    raw = CAGrad(c=0.5, rescale=0)(j)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=1)(j), raw / 1.25)
    torch.testing.assert_close(CAGrad(c=0.5, rescale=2)(j), raw / 1.5)
    torch.testing.assert_close(CAGrad(c=0.0)(j), j.mean(dim=0))


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_aggregator_weighting_permutation_and_scaling(matrix):
    weights = CAGradWeighting()(matrix @ matrix.T)
    d = CAGrad()(matrix)
    torch.testing.assert_close(d, weights @ matrix)
    scale = float(matrix.norm(dim=1).max())
    perm = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(4))
    assert (CAGrad()(matrix[perm]) - d).abs().max() <= 1e-7 * scale
    assert (CAGrad()(2.0 * matrix) - 2.0 * d).abs().max() <= 2e-7 * scale


def test_no_grad_fn_float32_and_bad_hyperparameters():
    j = full_rank(3, 6).float().requires_grad_(True)
    d = CAGrad()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert CAGradWeighting()(j @ j.T).grad_fn is None
    with pytest.raises(ValueError, match="c must"):
        CAGrad(c=-0.1)
    with pytest.raises(ValueError, match="rescale"):
        CAGrad(rescale=3)
    with pytest.raises(ValueError, match="reg_eps"):
        CAGrad(reg_eps=0.0)
