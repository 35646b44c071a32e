"""UPGrad: closed forms, agreement with a primal projection solved by cvxpy, properties."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from jdoptim.aggregation import UPGrad, UPGradWeighting
from tests.aggregation._reference_solvers import conflict, project_onto_dual_cone, relative_error
from tests.aggregation.matrices import MATRIX_IDS, MATRIX_VALUES, full_rank, rank_deficient


def _reference_upgrad(jacobian: torch.Tensor, preference: np.ndarray | None = None) -> np.ndarray:
    """Σᵢ π_C(pᵢ gᵢ), each projection solved in the primal (x ∈ Rⁿ) by cvxpy."""
    j = jacobian.double().numpy()
    m = j.shape[0]
    p = np.full(m, 1.0 / m) if preference is None else preference
    return sum(project_onto_dual_cone(jacobian, p[i] * j[i]) for i in range(m))


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_matches_primal_projection_and_does_not_conflict(matrix):
    d = UPGrad()(matrix)
    assert conflict(matrix, d) >= -1e-8
    expected = _reference_upgrad(matrix)
    scale = float(matrix.norm(dim=1).max())
    assert np.abs(d.numpy() - expected).max() <= 1e-6 * scale


def test_two_orthogonal_gradients_give_the_mean():
    j = torch.tensor([[3.0, 0.0, 0.0], [0.0, -2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad()(j), j.mean(dim=0))


def test_two_opposite_gradients_give_zero():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    d = UPGrad()(torch.stack([g, -3.0 * g]))
    torch.testing.assert_close(d, torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_identical_gradients_give_that_gradient():
    g = torch.tensor([1.0, -2.0, 0.5, 4.0], dtype=torch.float64)
    torch.testing.assert_close(UPGrad()(torch.stack([g, g, g])), g)


def test_single_gradient_is_returned_unchanged():
    g = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad()(g), g[0])


def test_hand_derived_two_conflicting_gradients():
    # g1 = (1, 0), g2 = (-1, 1). π_C(g1/2): (0.5, 0) violates -x1 + x2 ≥ 0 → (0.25, 0.25).
    # π_C(g2/2): (-0.5, 0.5) violates x1 ≥ 0 → (0, 0.5). Sum: (0.25, 0.75).
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(UPGrad()(j), torch.tensor([0.25, 0.75], dtype=torch.float64))
    # Weights: G = [[1, -1], [-1, 2]]; d = Jᵀw ⇒ w = (1, 0.75).
    torch.testing.assert_close(
        UPGradWeighting()(j @ j.T), torch.tensor([1.0, 0.75], dtype=torch.float64)
    )


def test_preference_vector_matches_reference():
    j = full_rank(4, 6, seed=11)
    p = np.array([0.1, 0.2, 0.3, 0.4])
    d = UPGrad(pref_vector=torch.tensor(p))(j)
    np.testing.assert_allclose(d.numpy(), _reference_upgrad(j, p), atol=1e-6)


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_aggregator_is_weighting_composed_with_gramian(matrix):
    weights = UPGradWeighting()(matrix @ matrix.T)
    torch.testing.assert_close(UPGrad()(matrix), weights @ matrix)


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_permutation_equivariance_and_positive_homogeneity(matrix):
    m = matrix.shape[0]
    perm = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    d = UPGrad()(matrix)
    scale = float(matrix.norm(dim=1).max())
    assert (UPGrad()(matrix[perm]) - d).abs().max() <= 1e-7 * scale
    assert (UPGrad()(7.5 * matrix) - 7.5 * d).abs().max() <= 1e-7 * 7.5 * scale


def test_output_has_no_grad_fn():
    j = full_rank(3, 5).requires_grad_(True)
    assert UPGrad()(j).grad_fn is None
    assert UPGradWeighting()(j @ j.T).grad_fn is None


def test_float32_input_gives_float32_non_conflicting_output():
    j = full_rank(6, 20, seed=3).float()
    d = UPGrad()(j)
    assert d.dtype == torch.float32
    assert conflict(j, d) >= -1e-5


@pytest.mark.parametrize("factor", [1e-30, 1e30])
def test_huge_and_tiny_gramians(factor):
    j = full_rank(5, 8, seed=4)
    d = UPGrad()(j)
    torch.testing.assert_close(UPGrad()(j * factor) / factor, d)


@pytest.mark.parametrize(
    "matrix",
    [
        rank_deficient(32, 40, rank=3, seed=1),
        torch.cat([full_rank(5, 6, seed=2)] * 4),  # every row four times
        torch.zeros(4, 5, dtype=torch.float64),
        rank_deficient(16, 30, rank=5, seed=3).float(),
    ],
    ids=["rank3_32", "duplicated_x4", "zero", "rank5_float32"],
)
def test_ill_conditioned_gramians_do_not_crash_and_do_not_conflict(matrix):
    d = UPGrad()(matrix)
    assert torch.isfinite(d).all()
    assert conflict(matrix, d) >= (-1e-4 if matrix.dtype == torch.float32 else -1e-8)


def test_indefinite_gramian_warns_once_and_returns_finite_weights():
    g = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, -0.5]], dtype=torch.float64)
    weighting = UPGradWeighting()
    with pytest.warns(RuntimeWarning, match="ill-conditioned"):
        first = weighting(g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = weighting(g)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(first, second)


def test_well_conditioned_gramian_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        UPGrad()(full_rank(8, 20, seed=9))


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="reg_eps"):
        UPGradWeighting(reg_eps=-1.0)
    with pytest.raises(ValueError, match="preference"):
        UPGrad(pref_vector=torch.ones(2))(full_rank(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        UPGrad(pref_vector=torch.tensor([1.0, float("nan")]))(full_rank(2, 4))


def test_matches_quadprog_weights_on_a_positive_definite_gramian():
    import quadprog

    j = full_rank(10, 30, seed=12)
    g = (j @ j.T).numpy()
    expected = sum(
        quadprog.solve_qp(g, np.zeros(10), np.eye(10), np.eye(10)[i] / 10)[0] for i in range(10)
    )
    weights = UPGradWeighting()(j @ j.T).numpy()
    assert relative_error(weights, expected) <= 1e-7


@pytest.mark.parametrize(("m", "n", "rank"), [(12, 20, 4), (32, 40, 3), (20, 10, 3), (64, 100, 8)])
def test_float32_permutation_spread_on_rank_deficient_matrices(m, n, rank):
    """Issue 16, item 4: in float32, on numerically rank-deficient Jacobians, permuting the rows
    moves ``d`` by float32 rounding only: at most ``1e-6`` of the largest gradient's norm (the
    scale at which ``d = Σ wᵢgᵢ`` is rounded term by term; relative to ``‖d‖`` itself the
    spread can be larger when the gradients nearly cancel, as float32 sums then must)."""
    for seed in range(3):
        matrix = rank_deficient(m, n, rank=rank, seed=seed).float()
        d = UPGrad()(matrix)
        scale = float(matrix.norm(dim=1).max())
        for k in range(3):
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(k))
            assert float((UPGrad()(matrix[perm]) - d).abs().max()) <= 1e-6 * scale


def test_degraded_solve_warning_points_at_the_callers_line():
    """Called directly or through ``UPGrad``'s aggregation, the warning names this file (the
    user's line), not a frame inside jdoptim or torch's ``Module.__call__``; after ``reset()``
    it warns again (its flag is declared state)."""
    g = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, -0.5]], dtype=torch.float64)
    weighting = UPGradWeighting()
    with pytest.warns(RuntimeWarning, match="ill-conditioned") as caught:
        weighting(g)
    assert caught[0].filename == __file__
    weighting.reset()
    with pytest.warns(RuntimeWarning, match="ill-conditioned") as caught:
        weighting(g)
    assert caught[0].filename == __file__
