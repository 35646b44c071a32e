"""Nash-MTL: against scipy's root finder, closed forms, caching, checkpoints, clipping."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from scipy.optimize import least_squares

from jdoptim.aggregation import NashMTL, NashMTLWeighting
from tests.aggregation.matrices import full_rank


def _scipy_alpha(gramian: np.ndarray) -> np.ndarray:
    """Solve (G/‖G‖_F) α = 1/α, α > 0, with scipy (trust-region reflective least squares)."""
    g = gramian / np.linalg.norm(gramian)
    result = least_squares(
        lambda x: g @ x - 1.0 / x,
        np.ones(len(g)),
        bounds=(0, np.inf),
        xtol=1e-15,
        ftol=1e-15,
        gtol=1e-15,
    )
    return result.x


@pytest.mark.parametrize("m,n,seed", [(2, 5, 1), (3, 10, 2), (5, 5, 3), (8, 30, 4)])
def test_matches_scipy_without_clipping(m, n, seed):
    j = full_rank(m, n, seed)
    g = j @ j.T
    alpha = NashMTLWeighting(max_norm=0.0)(g).numpy()
    np.testing.assert_allclose(alpha, _scipy_alpha(g.numpy()), rtol=1e-6)


def test_closed_forms():
    # Orthogonal: Ĝ = diag(9, 0.25)/‖·‖_F, αᵢ = Ĝᵢᵢ^{-1/2}.
    ortho = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64)
    frob = float(np.hypot(9.0, 0.25))
    expected = torch.tensor([9.0 / frob, 0.25 / frob], dtype=torch.float64) ** -0.5
    torch.testing.assert_close(NashMTLWeighting(max_norm=0.0)(ortho @ ortho.T), expected)
    # Identical gradients: Ĝ = 11ᵀ/2, so α = (1, 1) and d = 2g; m = 1: α = 1.
    g = torch.tensor([1.0, -2.0], dtype=torch.float64)
    torch.testing.assert_close(NashMTL(max_norm=0.0)(torch.stack([g, g])), 2 * g)
    torch.testing.assert_close(NashMTL(max_norm=0.0)(g.unsqueeze(0)), g)
    # Opposite gradients: no bargaining solution; the ridge keeps α finite and d = 0.
    d = NashMTL(max_norm=0.0)(torch.stack([g, -g]))
    assert d.abs().max() <= 1e-5 * g.norm()


def test_max_norm_clips_the_update():
    j = full_rank(3, 8, seed=5) * 10
    unclipped = NashMTL(max_norm=0.0)(j)
    clipped = NashMTL(max_norm=1.0)(j)
    assert unclipped.norm() > 1.0
    torch.testing.assert_close(clipped.norm(), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(clipped, unclipped / unclipped.norm())


def test_weights_are_cached_between_updates_and_reset_forgets_them():
    gramians = [(j @ j.T) for j in (full_rank(3, 6, seed=s) for s in range(6))]
    weighting = NashMTLWeighting(max_norm=0.0, update_weights_every=3)
    outputs = [weighting(g) for g in gramians]
    fresh = [NashMTLWeighting(max_norm=0.0)(g) for g in gramians]
    torch.testing.assert_close(outputs[0], fresh[0])
    torch.testing.assert_close(outputs[1], fresh[0])  # cached
    torch.testing.assert_close(outputs[2], fresh[0])  # cached
    torch.testing.assert_close(outputs[3], fresh[3])  # recomputed
    torch.testing.assert_close(outputs[5], fresh[3])
    weighting.reset()
    torch.testing.assert_close(weighting(gramians[4]), fresh[4])


def test_checkpoint_resumes_exactly():
    jacobians = [full_rank(4, 7, seed=s) for s in range(7)]
    reference = NashMTL(update_weights_every=2)
    expected = [reference(j) for j in jacobians]
    first = NashMTL(update_weights_every=2)
    for j in jacobians[:3]:
        first(j)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = NashMTL(update_weights_every=2)
    resumed.load_state_dict(torch.load(buffer))
    for j, e in zip(jacobians[3:], expected[3:]):
        torch.testing.assert_close(resumed(j), e, rtol=0, atol=0)


def test_permutation_scaling_and_aggregator():
    j = full_rank(4, 9, seed=6)
    g = j @ j.T
    weights = NashMTLWeighting(max_norm=0.0)(g)
    torch.testing.assert_close(NashMTLWeighting(max_norm=0.0)(7.0 * g), weights)
    perm = torch.tensor([3, 1, 0, 2])
    torch.testing.assert_close(NashMTLWeighting(max_norm=0.0)(g[perm][:, perm]), weights[perm])
    torch.testing.assert_close(NashMTL(max_norm=0.0)(j), weights @ j)
    torch.testing.assert_close(NashMTL(max_norm=0.0)(2.0 * j), 2.0 * (weights @ j))


def test_degenerate_no_grad_fn_float32_and_bad_hyperparameters():
    for j in [full_rank(6, 3, seed=1), torch.zeros(3, 4, dtype=torch.float64)]:
        assert torch.isfinite(NashMTL()(j)).all()
    j = full_rank(3, 6).float().requires_grad_(True)
    d = NashMTL()(j)
    assert d.grad_fn is None and d.dtype == torch.float32
    assert NashMTLWeighting()(j @ j.T).grad_fn is None
    with pytest.raises(ValueError, match="max_norm"):
        NashMTL(max_norm=-1.0)
    with pytest.raises(ValueError, match="update_weights_every"):
        NashMTL(update_weights_every=0)
    with pytest.raises(ValueError, match="optim_niter"):
        NashMTL(optim_niter=0)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e-30), (torch.float64, 1e-200)])
def test_tiny_gradients_keep_their_direction_issue_16(dtype: torch.dtype, scale: float) -> None:
    """The Gramian of such gradients underflows to 0 (NashMTL returned exactly 0): the weights
    come from the normalised Jacobian, and without clipping ``d`` is homogeneous."""
    matrix = full_rank(3, 7, 90)
    expected = NashMTL(max_norm=0.0)(matrix.to(dtype)).double()
    output = NashMTL(max_norm=0.0)((scale * matrix).to(dtype)).double()
    torch.testing.assert_close(output / scale, expected, rtol=1e-5, atol=0)


def test_clipping_uses_the_true_norm_at_huge_scales() -> None:
    """``‖Jᵀα‖`` of 1e30-sized float32 gradients is computed as 2^e ‖J'ᵀα‖ (no overflow):
    the update is the unclipped direction with norm ``max_norm``."""
    matrix = full_rank(3, 7, 91)
    direction = NashMTL(max_norm=0.0)(matrix).double()
    output = NashMTL(max_norm=2.0)((1e30 * matrix).float()).double()
    torch.testing.assert_close(output, 2.0 * direction / direction.norm(), rtol=1e-5, atol=0)
