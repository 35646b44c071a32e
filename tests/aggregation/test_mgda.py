"""MGDA: closed forms, agreement with a cvxpy min-norm solve on J, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import MGDA, MGDAWeighting
from tests.aggregation._reference_solvers import min_norm_convex_hull
from tests.aggregation.matrices import MATRIX_IDS, MATRIX_VALUES, full_rank


def _two_gradient_closed_form(g1: torch.Tensor, g2: torch.Tensor) -> torch.Tensor:
    """Sener & Koltun (2018), Alg. 1: γ = clip(⟨g2 − g1, g2⟩ / ‖g1 − g2‖², 0, 1)."""
    gamma = float(torch.clamp((g2 - g1) @ g2 / (g1 - g2).norm() ** 2, 0.0, 1.0))
    return gamma * g1 + (1 - gamma) * g2


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_matches_cvxpy_min_norm_point_and_does_not_conflict(matrix):
    d = MGDA()(matrix)
    expected = min_norm_convex_hull(matrix)
    scale = float(matrix.norm(dim=1).max())
    assert np.abs(d.numpy() - expected).max() <= 1e-6 * scale
    # Désidéri: ⟨gᵢ, d⟩ ≥ ‖d‖² for every i.
    assert ((matrix @ d) - d @ d >= -1e-8 * scale**2).all()
    weights = MGDAWeighting()(matrix @ matrix.T)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("seed", range(4))
def test_two_gradients_match_the_closed_form(seed):
    g1, g2 = full_rank(2, 5, seed=30 + seed)
    torch.testing.assert_close(MGDA()(torch.stack([g1, g2])), _two_gradient_closed_form(g1, g2))


def test_orthogonal_opposite_identical_and_single():
    ortho = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    # γ = 16/25: d = (48/25, 36/25).
    torch.testing.assert_close(MGDA()(ortho), torch.tensor([1.92, 1.44], dtype=torch.float64))
    g = torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(
        MGDA()(torch.stack([g, -3.0 * g])), torch.zeros(3, dtype=torch.float64), atol=1e-9, rtol=0
    )
    torch.testing.assert_close(
        MGDAWeighting()(torch.outer(torch.tensor([1.0, -3.0]), torch.tensor([1.0, -3.0]))),
        torch.tensor([0.75, 0.25]),
    )
    torch.testing.assert_close(MGDA()(torch.stack([g, g])), g)
    torch.testing.assert_close(MGDA()(g.unsqueeze(0)), g)


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_aggregator_weighting_permutation_and_scaling(matrix):
    d = MGDA()(matrix)
    torch.testing.assert_close(d, MGDAWeighting()(matrix @ matrix.T) @ matrix)
    scale = float(matrix.norm(dim=1).max())
    perm = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(1))
    assert (MGDA()(matrix[perm]) - d).abs().max() <= 1e-7 * scale
    assert (MGDA()(3.0 * matrix) - 3.0 * d).abs().max() <= 1e-7 * 3.0 * scale


def test_no_grad_fn_float32_and_zero_gramian():
    j = full_rank(4, 3).float().requires_grad_(True)
    d = MGDA()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert MGDAWeighting()(j @ j.T).grad_fn is None
    torch.testing.assert_close(MGDAWeighting()(torch.zeros(3, 3)), torch.full((3,), 1.0 / 3))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="reg_eps"):
        MGDA(reg_eps=0.0)


def test_large_gradients_issue_16() -> None:
    """The equality constraint ``Σ Dᵢwᵢ' = 1`` used to become tiny for quadprog ('constraints
    are inconsistent'); the one-gradient answer is the gradient itself."""
    torch.testing.assert_close(MGDA()(torch.tensor([[3e7]])), torch.tensor([3e7]))
    torch.testing.assert_close(MGDAWeighting()(torch.tensor([[9e34]])), torch.tensor([1.0]))


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_any_positive_rescaling_gives_the_rescaled_answer(matrix):
    """``A(cJ) = c A(J)`` for c from 1e-12 to 1e12 in float64, against the cvxpy min-norm point
    at scale 1 (a Gramian of ‖g‖² ≳ 1e17 made quadprog fail)."""
    expected = torch.from_numpy(min_norm_convex_hull(matrix))
    scale = float(matrix.norm(dim=1).max())
    for c in (1e-12, 1e-5, 1e9, 1e12):
        assert (MGDA()(c * matrix) / c - expected).abs().max() <= 1e-6 * scale


@pytest.mark.parametrize(
    ("m", "n", "active"), [(64, 40, False), (32, 400, True)], ids=["pivoting", "all_active"]
)
def test_solution_satisfies_the_kkt_conditions(m, n, active):
    """The complementarity form against the QP's own optimality conditions: ``w`` in the
    simplex and ``(Gw)ᵢ = wᵀGw`` where ``wᵢ > 0``, ``≥`` elsewhere (up to the ridge). Random
    gradients with ``m ≪ n`` are all active (the one-factorisation path); ``m > n`` is not."""
    matrix = full_rank(m, n, 91)
    gramian = matrix @ matrix.T
    w = MGDAWeighting()(gramian)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    products, value = gramian @ w, w @ gramian @ w
    tolerance = 1e-6 * float(gramian.diagonal().max())
    assert (products >= value - tolerance).all()
    assert ((products - value).abs()[w > 1e-9] <= tolerance).all()
    assert bool((w > 0).all()) == active


@pytest.mark.parametrize("modules", [False, True], ids=["jacobian", "engine"])
def test_optimizer_step_with_losses_scaled_by_1e9_issue_19(modules):
    """Issue 19, item 6: losses scaled by 1e9 (‖g‖² ≈ 1e20) made quadprog raise 'constraints
    are inconsistent' inside a step; the step is MGDA's min-norm point of the explicit
    Jacobian (cvxpy), on both the Jacobian and the Gramian-engine paths."""
    from jdoptim import JDOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    before = [p.detach().clone() for p in model.parameters()]
    kwargs = {"modules": model} if modules else {}
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), MGDA(), **kwargs)

    def losses():
        out = model(x)
        return [1e9 * out[:, 0].square().mean(), 1e9 * (out[:, 1] - 1.0).square().mean()]

    rows = [
        torch.autograd.grad(loss, list(model.parameters()), retain_graph=True) for loss in losses()
    ]
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]).double()
    expected = torch.from_numpy(min_norm_convex_hull(jacobian))
    opt.step(losses())
    change = torch.cat([(b - p.detach()).reshape(-1) for b, p in zip(before, model.parameters())])
    torch.testing.assert_close(
        change.double(), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())
    )
