"""DualProj: closed forms, agreement with a primal projection solved by cvxpy, properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jdoptim.aggregation import DualProj, DualProjWeighting
from tests.aggregation._reference_solvers import conflict, project_onto_dual_cone
from tests.aggregation.matrices import MATRIX_IDS, MATRIX_VALUES, full_rank, rank_deficient


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_matches_primal_projection_of_the_mean_and_does_not_conflict(matrix):
    d = DualProj()(matrix)
    assert conflict(matrix, d) >= -1e-8
    expected = project_onto_dual_cone(matrix, matrix.mean(dim=0).numpy())
    scale = float(matrix.norm(dim=1).max())
    assert np.abs(d.numpy() - expected).max() <= 1e-6 * scale


def test_two_orthogonal_gradients_give_the_mean():
    j = torch.tensor([[2.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    torch.testing.assert_close(DualProj()(j), j.mean(dim=0))


def test_two_opposite_gradients():
    # Mean of g and -3g is -g: projected onto {x : gᵀx = 0} it is 0.
    g = torch.tensor([1.0, 2.0, -1.0], dtype=torch.float64)
    d = DualProj()(torch.stack([g, -3.0 * g]))
    torch.testing.assert_close(d, torch.zeros(3, dtype=torch.float64), atol=1e-8, rtol=0)


def test_identical_gradients_and_single_gradient():
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(DualProj()(torch.stack([g, g])), g)
    torch.testing.assert_close(DualProj()(g.unsqueeze(0)), g)


def test_hand_derived_two_conflicting_gradients():
    # g1 = (1, 0), g2 = (-2, 1): mean (-0.5, 0.5) violates x1 ≥ 0 → (0, 0.5), and
    # ⟨g2, (0, 0.5)⟩ = 0.5 ≥ 0. Weights: Jᵀw = (0, 0.5) ⇒ w2 = 0.5, w1 = 1.
    j = torch.tensor([[1.0, 0.0], [-2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(DualProj()(j), torch.tensor([0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(
        DualProjWeighting()(j @ j.T), torch.tensor([1.0, 0.5], dtype=torch.float64)
    )


def test_preference_vector():
    j = full_rank(4, 5, seed=21)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    expected = project_onto_dual_cone(j, (p @ j).numpy())
    np.testing.assert_allclose(DualProj(pref_vector=p)(j).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_aggregator_weighting_permutation_and_scaling(matrix):
    weights = DualProjWeighting()(matrix @ matrix.T)
    d = DualProj()(matrix)
    torch.testing.assert_close(d, weights @ matrix)
    scale = float(matrix.norm(dim=1).max())
    perm = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(0))
    assert (DualProj()(matrix[perm]) - d).abs().max() <= 1e-7 * scale
    assert (DualProj()(0.25 * matrix) - 0.25 * d).abs().max() <= 1e-7 * scale


def test_output_has_no_grad_fn_and_keeps_dtype():
    j = full_rank(3, 5).float().requires_grad_(True)
    d = DualProj()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert DualProjWeighting()(j @ j.T).grad_fn is None


def test_ill_conditioned_inputs_do_not_crash():
    for matrix in [rank_deficient(20, 30, 2, seed=4), torch.zeros(3, 4, dtype=torch.float64)]:
        d = DualProj()(matrix)
        assert torch.isfinite(d).all()
        assert conflict(matrix, d) >= -1e-8


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="reg_eps"):
        DualProj(reg_eps=2.0)
    with pytest.raises(ValueError, match="preference"):
        DualProjWeighting(pref_vector=torch.ones(3))(torch.eye(2))


@pytest.mark.parametrize(("m", "n", "rank"), [(12, 20, 4), (32, 40, 3), (20, 10, 3), (64, 100, 8)])
def test_float32_permutation_spread_on_rank_deficient_matrices(m, n, rank):
    """Issue 16, item 4 (as for UPGrad): permuting the rows of a float32 rank-deficient
    Jacobian moves ``d`` by at most ``1e-6`` of the largest gradient's norm."""
    for seed in range(3):
        matrix = rank_deficient(m, n, rank=rank, seed=seed).float()
        d = DualProj()(matrix)
        scale = float(matrix.norm(dim=1).max())
        for k in range(3):
            perm = torch.randperm(m, generator=torch.Generator().manual_seed(k))
            assert float((DualProj()(matrix[perm]) - d).abs().max()) <= 1e-6 * scale
