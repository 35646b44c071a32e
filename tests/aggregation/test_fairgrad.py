"""FairGrad: against scipy's least_squares on Gw = w^{-1/α} (the authors' solver), closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from jdoptim.aggregation import FairGrad, FairGradWeighting
from tests.aggregation.matrices import full_rank, scaled


def _scipy_weights(gramian: np.ndarray, alpha: float) -> np.ndarray:
    m = gramian.shape[0]
    result = least_squares(
        lambda x: gramian @ x - x ** (-1.0 / alpha),
        np.ones(m) / m,
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
        max_nfev=10_000,
    )
    return result.x


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize(
    "matrix",
    [full_rank(3, 10, 1), full_rank(5, 5, 2)],
    ids=["3x10", "5x5"],
)
def test_matches_scipy_least_squares(matrix, alpha):
    g = matrix @ matrix.T
    weights = FairGradWeighting(alpha=alpha)(g).numpy()
    expected = _scipy_weights(g.numpy(), alpha)
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    # And the equation itself.
    np.testing.assert_allclose(g.numpy() @ weights, weights ** (-1.0 / alpha), rtol=1e-7)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_ill_conditioned_gramian_solves_the_equation(alpha):
    # Gradient norms from 1e-5 to 10: scipy's least_squares does not converge here (residual
    # 0.5 at α = 2); check the backward error of the equation directly.
    g = (lambda j: j @ j.T)(scaled(4, 8, 3) * 1e-2).numpy()
    w = FairGradWeighting(alpha=alpha)(torch.from_numpy(g)).numpy()
    power = w ** (-1.0 / alpha)
    assert (w > 0).all()
    assert (np.abs(g @ w - power) / (np.abs(g) @ w + power)).max() <= 1e-9


def test_closed_forms():
    # Orthogonal gradients: Gᵢᵢ wᵢ = wᵢ^{-1/α} ⇒ wᵢ = Gᵢᵢ^{-α/(1+α)}.
    ortho = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    for alpha in (1.0, 3.0):
        expected = torch.tensor([9.0, 0.25], dtype=torch.float64) ** (-alpha / (1 + alpha))
        torch.testing.assert_close(FairGradWeighting(alpha)(ortho @ ortho.T), expected)
    # Identical gradients: 2t‖g‖² = t^{-1/α} ⇒ t = (2‖g‖²)^{-α/(1+α)}.
    g = torch.tensor([1.0, 2.0], dtype=torch.float64)
    t = (2 * 5.0) ** (-2.0 / 3.0)
    torch.testing.assert_close(FairGrad(alpha=2.0)(torch.stack([g, g])), 2 * t * g)
    # m = 1: w = ‖g‖^{-2α/(1+α)}.
    torch.testing.assert_close(FairGrad()(g.unsqueeze(0)), 5.0 ** (-0.5) * g)
    # Opposite gradients: no solution without the ridge; d stays 0 by symmetry.
    d = FairGrad()(torch.stack([g, -g]))
    assert d.abs().max() <= 1e-5 * g.norm()


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_scaling_permutation_and_aggregator(alpha):
    j = full_rank(4, 9, seed=50)
    g = j @ j.T
    weights = FairGradWeighting(alpha)(g)
    factor = 3.0
    torch.testing.assert_close(
        FairGradWeighting(alpha)(factor**2 * g), factor ** (-2 * alpha / (1 + alpha)) * weights
    )
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(FairGradWeighting(alpha)(g[perm][:, perm]), weights[perm])
    torch.testing.assert_close(FairGrad(alpha)(j), weights @ j)


def test_degenerate_inputs_do_not_crash():
    for j in [full_rank(6, 3, seed=1), torch.zeros(3, 4, dtype=torch.float64)]:
        weights = FairGradWeighting()(j @ j.T)
        assert torch.isfinite(weights).all() and (weights >= 0).all()


def test_no_grad_fn_float32_and_bad_hyperparameters():
    j = full_rank(3, 6).float().requires_grad_(True)
    d = FairGrad()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert FairGradWeighting()(j @ j.T).grad_fn is None
    with pytest.raises(ValueError, match="alpha"):
        FairGrad(alpha=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        FairGrad(max_iter=0)
