"""ConFIG (Liu et al., 2024) against its definition on the explicit Jacobian (with an SVD)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import ConFIG, ConFIGWeighting

from .matrices import full_rank, scaled, with_zero_row


def direct_config(
    matrix: Tensor, preference: Tensor | None = None, rtol: float | None = None
) -> Tensor:
    """``d = (Σ_i ⟨g_i, g_u⟩) g_u`` with ``g_u ∝ U⁺ p``, ``U`` the unit rows (zero rows stay 0);
    ``rtol``: the pseudo-inverse's relative cut-off on the singular values of ``U`` (default:
    torch's, ``max(m, n)·ε``; ConFIG's default cuts the cosine matrix's eigenvalues at ``√ε``,
    i.e. ``U``'s singular values at ``ε^{1/4}``)."""
    norms = matrix.norm(dim=1, keepdim=True)
    units = torch.where(norms > 0, matrix / norms.clamp(min=1e-300), 0.0)
    if preference is None:
        preference = torch.ones(matrix.shape[0], dtype=matrix.dtype)
    direction = torch.linalg.pinv(units, rtol=rtol) @ preference
    if not direction.norm() > 0:
        return torch.zeros_like(direction)
    direction = direction / direction.norm()
    return (matrix @ direction).sum() * direction


@pytest.mark.parametrize(
    "matrix",
    [full_rank(3, 10, 50), full_rank(5, 5, 51), scaled(4, 8, 52), with_zero_row(4, 6, 53)],
    ids=["3x10", "5x5", "scaled", "zero_row"],
)
def test_matches_the_definition(matrix: Tensor) -> None:
    torch.testing.assert_close(ConFIG()(matrix), direct_config(matrix), rtol=1e-7, atol=1e-9)


def test_preference() -> None:
    matrix = full_rank(3, 7, 54)
    preference = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    torch.testing.assert_close(
        ConFIG(preference)(matrix), direct_config(matrix, preference), rtol=1e-7, atol=1e-9
    )


def test_orthogonal_gradients_closed_form() -> None:
    # g_1 = (2, 0), g_2 = (0, 3): g_u = (1, 1)/√2, Σ⟨g_i, g_u⟩ = 5/√2, d = (5/2, 5/2).
    matrix = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(ConFIG()(matrix), torch.tensor([2.5, 2.5], dtype=torch.float64))


@pytest.mark.parametrize("seed", range(5))
def test_conflict_free_with_equal_cosines(seed: int) -> None:
    matrix = full_rank(4, 9, 60 + seed)
    direction = ConFIG()(matrix)
    cosines = matrix @ direction / (matrix.norm(dim=1) * direction.norm())
    assert (cosines > 0).all()
    torch.testing.assert_close(cosines, cosines.mean().expand(4))


def test_all_zero_gives_zero() -> None:
    assert (ConFIG()(torch.zeros(3, 4, dtype=torch.float64)) == 0).all()


def test_float32_rank_deficient_is_finite() -> None:
    matrix = (full_rank(6, 2, 55) @ full_rank(2, 9, 56)).float()
    assert torch.isfinite(ConFIG()(matrix)).all()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="preference"):
        ConFIG(torch.ones(2))(full_rank(3, 4))
    with pytest.raises(ValueError, match="rcond"):
        ConFIGWeighting(rcond=-1.0)
    with pytest.raises(ValueError, match="finite"):
        ConFIG(torch.tensor([1.0, float("nan")]))


def test_float32_keeps_genuine_directions_issue_16() -> None:
    """The cut-off ``m·√ε`` on the cosine matrix's eigenvalues dropped this direction in
    float32 (which gave [1.707, 1.707, 0.060]); the definition (pinv, float64) gives
    [0.043, 0.043, -0.353]."""
    matrix = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.7071, 0.7071, 0.05]])
    expected = direct_config(matrix.double())
    torch.testing.assert_close(ConFIG()(matrix).double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        expected[2], torch.tensor(-0.353, dtype=torch.float64), atol=1e-3, rtol=0
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_opposite_gradients_give_zero_in_any_order(dtype: torch.dtype, seed: int) -> None:
    """Where ``U⁺1 = 0`` (two exactly opposite gradients) the method's limit is ``0``: it gave
    ``Σgᵢ`` or ``0`` depending on the row order."""
    r = full_rank(1, 6, 70 + seed)[0]
    for matrix in (torch.stack([r, -7.0 * r]), torch.stack([-7.0 * r, r])):
        assert (ConFIG()(matrix.to(dtype)) == 0).all()


@pytest.mark.parametrize("seed", range(3))
def test_continuous_towards_opposite_gradients(seed: int) -> None:
    """``g₂ = -7g₁ + δh``: ``d`` goes to ``0`` with ``δ`` (as ``‖d‖ ∝ √(1 + cos θ)``), matching
    the definition on the explicit Jacobian with the same cut-off; once ``1 + cos θ`` falls
    below it, ``d`` is the limit ``0`` (a jump of at most ``ε^{1/4} Σ‖gᵢ‖``)."""
    r, h = full_rank(2, 6, 80 + seed)
    cutoff = torch.finfo(torch.float64).eps ** 0.25
    norms = []
    for delta in (1e-1, 3e-2, 1e-2):
        matrix = torch.stack([r, -7.0 * r + delta * h])
        output = ConFIG()(matrix)
        # Both sides lose the digits that cancel in u₁ + u₂ (about |log₁₀ δ|).
        atol = 1e-8 * float(matrix.norm())
        expected = direct_config(matrix, rtol=cutoff)
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=atol)
        norms.append(float(output.norm()))
    assert norms[0] > norms[1] > norms[2] and norms[2] < 0.2 * norms[0]  # ‖d‖ = O(δ)
    # Below the cut-off the pseudo-inverse's remaining projection of 1 is rounding noise, which
    # the normalisation would blow up to ±Σgᵢ: ConFIG returns the limit.
    assert (ConFIG()(torch.stack([r, -7.0 * r + 1e-6 * h])) == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_issue_19(dtype: torch.dtype) -> None:
    """``linalg_eigh_cpu`` is not implemented for Half/BFloat16: computed in float32, returned
    in the input's dtype."""
    matrix = full_rank(3, 5, 57).to(dtype)
    output = ConFIG()(matrix)
    assert output.dtype == dtype
    torch.testing.assert_close(
        output.double(), direct_config(matrix.double()), rtol=1e-2, atol=1e-2
    )
    assert ConFIGWeighting()(matrix @ matrix.T).dtype == dtype


@pytest.mark.parametrize("modules", [False, True], ids=["jacobian", "engine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_optimizer_step_on_a_low_precision_model_issue_19(
    dtype: torch.dtype, modules: bool
) -> None:
    """A bfloat16/float16 model stepped with ConFIG (its eigendecomposition has no Half kernel)
    moves by ConFIG's update of its explicit Jacobian, up to the parameters' rounding."""
    from jdoptim import JDOptimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(dtype)
    x = torch.randn(5, 3).to(dtype)
    before = [p.detach().double() for p in model.parameters()]
    kwargs = {"modules": model} if modules else {}
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), ConFIG(), **kwargs)

    def losses() -> list[Tensor]:
        out = model(x).float()
        return [out[:, 0].square().mean(), (out[:, 1] - 1.0).square().mean()]

    params = list(model.parameters())
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses()]
    jacobian = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows]).double()
    opt.step(losses())
    assert all(p.dtype == dtype for p in model.parameters())
    change = torch.cat([(b - p.detach().double()).reshape(-1) for b, p in zip(before, params)])
    torch.testing.assert_close(change, direct_config(jacobian), rtol=0, atol=3e-2)
