"""MoDoWeighting and SDMGradWeighting (of A = J₁J₂ᵀ): one step by hand, the simplex projection
against its KKT conditions, TorchJD as an outside oracle, checkpointing and input checks."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import MoDo, MoDoWeighting, SDMGrad, SDMGradWeighting
from jdoptim.linalg.simplex import project_onto_simplex

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


def _cross(m: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    J1 = torch.randn(m, 5, generator=g, dtype=torch.float64)
    J2 = J1 + 0.5 * torch.randn(m, 5, generator=g, dtype=torch.float64)
    return J1 @ J2.T


@pytest.mark.parametrize("seed", range(10))
def test_simplex_projection_satisfies_its_kkt_conditions(seed):
    v = torch.randn(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3
    x = project_onto_simplex(v)
    assert (x >= 0).all()
    torch.testing.assert_close(x.sum(), torch.tensor(1.0, dtype=torch.float64))
    # x = max(v − θ, 0): v − x equals θ on the support, and v ≤ θ off it.
    theta = (v - x)[x > 0]
    torch.testing.assert_close(theta, theta[0].expand_as(theta))
    assert (v[x == 0] <= theta[0] + 1e-12).all()


def test_modo_one_step_by_hand():
    # λ₀ = (½, ½), A = [[2, 1], [0, 4]], γ = 0.1, ρ = 0: step = Aλ = (1.5, 2);
    # λ₀ − γ·step = (0.35, 0.30) sums to 0.65, so θ = −0.175: λ₁ = (0.525, 0.475).
    A = torch.tensor([[2.0, 1.0], [0.0, 4.0]], dtype=torch.float64)
    weights = MoDoWeighting(gamma=0.1, rho=0.0)(A)
    torch.testing.assert_close(weights, torch.tensor([0.525, 0.475], dtype=torch.float64))


def test_sdmgrad_one_inner_step_by_hand():
    # A = diag(1, 9): s̄ = (1 + 3)/2 = 2, Ã = A/(4 + 1e-8); w₀ = w̃ = (½, ½), λ = 0.3, η = 0.1:
    # v = Ã (w₀ + λw̃) = (0.65, 5.85)/(4 + 1e-8); w₁ = Π(w₀ − η v); output (w₁ + λw̃)/(1 + λ).
    A = torch.diag(torch.tensor([1.0, 9.0], dtype=torch.float64))
    v = torch.tensor([0.65, 5.85], dtype=torch.float64) / (4 + 1e-8)
    step = torch.tensor([0.5, 0.5], dtype=torch.float64) - 0.1 * v
    theta = (step.sum() - 1) / 2
    w1 = (step - theta).clamp(min=0)
    expected = (w1 + 0.3 * 0.5) / 1.3
    weights = SDMGradWeighting(lr=0.1, n_iter=1, lambda_=0.3)(A)
    torch.testing.assert_close(weights, expected)


@pytest.mark.parametrize("m", [2, 3, 6])
def test_match_torchjd_over_several_calls(m):
    pairs = [
        (MoDoWeighting(0.3, 0.05), torchjd_aggregation.MoDoWeighting(0.3, 0.05)),
        (SDMGradWeighting(), torchjd_aggregation.SDMGradWeighting()),
        (
            SDMGradWeighting(lr=2.0, momentum=0.2, n_iter=5, lambda_=0.0),
            torchjd_aggregation.SDMGradWeighting(lr=2.0, momentum=0.2, n_iter=5, lambda_=0.0),
        ),
    ]
    for ours, theirs in pairs:
        for seed in range(4):
            A = _cross(m, seed)
            torch.testing.assert_close(ours(A), theirs(A))


@pytest.mark.parametrize("make", [lambda: MoDo(gamma=0.2), lambda: SDMGrad(n_iter=3)])
def test_state_dict_resumes_the_same_trajectory(make):
    matrices = [_cross(3, seed) for seed in range(5)]
    straight = make()
    expected = [straight.weighting(A) for A in matrices]
    first = make()
    for A in matrices[:2]:
        first.weighting(A)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for A, want in zip(matrices[2:], expected[2:]):
        torch.testing.assert_close(resumed.weighting(A), want)
    resumed.reset()
    torch.testing.assert_close(resumed.weighting(matrices[0]), expected[0])


def test_input_checks():
    with pytest.raises(ValueError, match="gamma"):
        MoDoWeighting(gamma=0.0)
    with pytest.raises(ValueError, match="momentum"):
        SDMGradWeighting(momentum=1.0)
    with pytest.raises(ValueError, match="square matrix A"):
        MoDoWeighting()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="finite"):
        SDMGradWeighting()(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    weighting = MoDoWeighting()
    weighting(torch.eye(3))
    with pytest.raises(ValueError, match="reset"):
        weighting(torch.eye(2))


def test_outputs_have_no_grad_fn():
    A = _cross(3, 0).requires_grad_()
    assert MoDoWeighting()(A).grad_fn is None
    assert SDMGradWeighting()(A).grad_fn is None
