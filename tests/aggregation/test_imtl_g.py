"""IMTL-G: the paper's own formula on J, the equal-projection property, closed forms."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import IMTLG, IMTLGWeighting
from tests.aggregation.matrices import MATRIX_IDS, MATRIX_VALUES, full_rank, with_duplicated_row


def _paper_weights(jacobian: torch.Tensor) -> torch.Tensor:
    """Liu et al. (2021), Eq. (7): α₂:ₘ = g₁Uᵀ(DUᵀ)⁻¹, α₁ = 1 − Σα₂:ₘ, with rows
    Dᵢ = g₁ − gᵢ and Uᵢ = u₁ − uᵢ (uᵢ = gᵢ/‖gᵢ‖), i = 2..m."""
    u = jacobian / jacobian.norm(dim=1, keepdim=True)
    d = jacobian[:1] - jacobian[1:]
    uu = u[:1] - u[1:]
    rest = jacobian[0] @ uu.T @ torch.linalg.inv(d @ uu.T)
    return torch.cat([(1.0 - rest.sum()).unsqueeze(0), rest])


@pytest.mark.parametrize("m,n,seed", [(2, 5, 1), (3, 10, 2), (5, 5, 3), (6, 20, 4)])
def test_matches_the_papers_formula(m, n, seed):
    j = full_rank(m, n, seed)
    torch.testing.assert_close(IMTLGWeighting()(j @ j.T), _paper_weights(j))


@pytest.mark.parametrize(
    "matrix", [full_rank(4, 9, 5), with_duplicated_row(4, 6, 7)], ids=["full", "duplicated"]
)
def test_equal_projections_on_unit_gradients(matrix):
    d = IMTLG()(matrix)
    projections = (matrix / matrix.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(projections, projections.mean().expand_as(projections))
    torch.testing.assert_close(
        IMTLGWeighting()(matrix @ matrix.T).sum(), torch.tensor(1.0, dtype=torch.float64)
    )


def test_closed_forms():
    # G = diag(9, 16), s = (3, 4): G⁻¹s = (1/3, 1/4) ⇒ w = (4/7, 3/7), d = (12/7, 12/7).
    ortho = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(IMTLG()(ortho), torch.full((2,), 12.0 / 7, dtype=torch.float64))
    g = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(IMTLG()(torch.stack([g, -g])), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(IMTLG()(torch.stack([g, g, g])), g)
    torch.testing.assert_close(IMTLG()(g.unsqueeze(0)), g)


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_aggregator_weighting_permutation_and_scaling(matrix):
    weights = IMTLGWeighting()(matrix @ matrix.T)
    assert torch.isfinite(weights).all()
    d = IMTLG()(matrix)
    torch.testing.assert_close(d, weights @ matrix)
    perm = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(IMTLGWeighting()(matrix[perm] @ matrix[perm].T), weights[perm])
    torch.testing.assert_close(IMTLG()(2.5 * matrix), 2.5 * d)


def test_no_grad_fn_and_float32():
    j = full_rank(3, 6).float().requires_grad_(True)
    d = IMTLG()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert IMTLGWeighting()(j @ j.T).grad_fn is None
    torch.testing.assert_close(IMTLGWeighting()(torch.zeros(2, 2)), torch.zeros(2))
