"""Aligned-MTL: against an SVD of J (Procrustes: Ĵ = σ U Vᵀ), closed forms, properties."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import AlignedMTL, AlignedMTLWeighting
from tests.aggregation.matrices import MATRIX_IDS, MATRIX_VALUES, full_rank


def _svd_reference(jacobian: torch.Tensor, scale_mode: str, pref: torch.Tensor) -> torch.Tensor:
    """d = σ V Uᵀ p from the thin SVD J = U S Vᵀ restricted to its nonzero singular values."""
    u, s, vh = torch.linalg.svd(jacobian, full_matrices=False)
    keep = s > s.max() * 1e-9
    u, s, vh = u[:, keep], s[keep], vh[keep]
    sigma = {
        "min": s.min(),
        "median": s.sort().values[(len(s) - 1) // 2],
        "rmse": (s**2).mean().sqrt(),
    }[scale_mode]
    return sigma * vh.T @ (u.T @ pref)


@pytest.mark.parametrize("scale_mode", ["min", "median", "rmse"])
@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_matches_svd_reference(matrix, scale_mode):
    m = matrix.shape[0]
    pref = torch.full((m,), 1.0 / m, dtype=torch.float64)
    d = AlignedMTL(scale_mode=scale_mode)(matrix)
    # The Gramian squares the condition number (1e12 for "scaled"): allow for it.
    torch.testing.assert_close(d, _svd_reference(matrix, scale_mode, pref), rtol=1e-5, atol=1e-6)


def test_aligned_system_is_orthogonal_with_equal_norms():
    j = full_rank(4, 10, seed=3)
    weighting = AlignedMTLWeighting(pref_vector=torch.ones(4, dtype=torch.float64))
    # The balance matrix B has columns B eᵢ = weights for pᵢ = eᵢ; aligned rows Ĵ = B J.
    b = torch.stack(
        [AlignedMTLWeighting(pref_vector=e)(j @ j.T) for e in torch.eye(4, dtype=torch.float64)]
    )
    aligned = b @ j
    s_min = torch.linalg.svdvals(j).min()
    torch.testing.assert_close(aligned @ aligned.T, s_min**2 * torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(weighting(j @ j.T), b.sum(dim=0))


def test_closed_forms():
    # G = diag(9, 16): σ = 3, B = diag(3/3, 3/4), w = B (1/2, 1/2) = (1/2, 3/8), d = (1.5, 1.5).
    ortho = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(AlignedMTL()(ortho), torch.tensor([1.5, 1.5], dtype=torch.float64))
    g = torch.tensor([1.0, 2.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(
        AlignedMTL()(torch.stack([g, -g])), torch.zeros(3, dtype=torch.float64)
    )
    torch.testing.assert_close(AlignedMTL()(torch.stack([g, g])), g)
    torch.testing.assert_close(AlignedMTL()(g.unsqueeze(0)), g)
    torch.testing.assert_close(AlignedMTLWeighting()(torch.zeros(3, 3)), torch.zeros(3))


@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_aggregator_weighting_permutation_and_scaling(matrix):
    weights = AlignedMTLWeighting()(matrix @ matrix.T)
    d = AlignedMTL()(matrix)
    torch.testing.assert_close(d, weights @ matrix)
    # Weights use 1/√λ of the Gramian's eigenvalues, accurate to ~cond(G)·eps: scale the tolerance.
    s = torch.linalg.svdvals(matrix)
    s = s[s > 1e-9 * s.max()]
    rtol = max(1e-7, 1e-14 * float(s.max() / s.min()) ** 2)
    perm = torch.randperm(matrix.shape[0], generator=torch.Generator().manual_seed(3))
    permuted = AlignedMTLWeighting()(matrix[perm] @ matrix[perm].T)
    torch.testing.assert_close(permuted, weights[perm], rtol=rtol, atol=1e-7)
    torch.testing.assert_close(AlignedMTL()(4.0 * matrix), 4.0 * d, rtol=rtol, atol=1e-7)


def test_no_grad_fn_float32_and_bad_hyperparameters():
    j = full_rank(3, 6).float().requires_grad_(True)
    d = AlignedMTL()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert AlignedMTLWeighting()(j @ j.T).grad_fn is None
    with pytest.raises(ValueError, match="scale_mode"):
        AlignedMTL(scale_mode="max")
    with pytest.raises(ValueError, match="preference"):
        AlignedMTLWeighting(pref_vector=torch.ones(2))(torch.eye(3))
