"""PCD / PCDWeighting: hand-derived two-loss cases, special cases, TorchJD as an outside oracle,
an interior-point solution of the QP, and checkpointing."""

from __future__ import annotations

import math

import pytest
import torch

from jdoptim.aggregation import PCD, PCDWeighting

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


def _unnormalized(tau: float = 0.5) -> PCDWeighting:
    """β = 0 and ε = 0: v̂ᵢ = ‖gᵢ‖², so g̃ᵢ are the unit gradients."""
    return PCDWeighting(tau=tau, beta=0.0, eps=0.0)


def test_two_losses_constraint_inactive_gives_the_primary_gradient():
    # cos(g1, g2) = 0.8 ≥ τ = 0.5: d = g1.
    J = torch.tensor([[2.0, 0.0], [4.0, 3.0]], dtype=torch.float64)
    weights = _unnormalized()(J @ J.T)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_two_losses_constraint_active_hand_derived():
    # Unit gradients u1 = (1, 0), u2 = (-1, 1)/√2, c = cos = -1/√2, τ = 0.5: the constraint
    # u2ᵀd = τ gives d̃ = u1 + μ u2 with μ = τ - c; ‖d̃‖² = 1 + 2μc + μ²; then
    # w = (1/‖g1‖, μ/‖g2‖) · ‖g1‖/‖d̃‖.
    J = torch.tensor([[2.0, 0.0], [-3.0, 3.0]], dtype=torch.float64)
    c, tau = -1 / math.sqrt(2), 0.5
    mu = tau - c
    norm = math.sqrt(1 + 2 * mu * c + mu**2)
    expected = torch.tensor([1 / 2 * 2 / norm, mu / (3 * math.sqrt(2)) * 2 / norm])
    weights = _unnormalized(tau)(J @ J.T)
    torch.testing.assert_close(weights, expected.double())
    d = weights @ J
    torch.testing.assert_close(d.norm(), torch.tensor(2.0, dtype=torch.float64))  # ‖g1‖
    u2 = J[1] / J[1].norm()
    # The constraint holds with equality on d̃ = d · ‖d̃‖/‖g1‖.
    torch.testing.assert_close(u2 @ d * norm / 2, torch.tensor(tau, dtype=torch.float64))


def test_infeasible_constraints_give_the_primary_gradient():
    J = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    weights = _unnormalized(0.1)(J @ J.T)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


def test_zero_primary_gradient_gives_zero():
    J = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64)
    assert torch.equal(PCDWeighting()(J @ J.T), torch.zeros(2, dtype=torch.float64))


def _qp_reference(J: torch.Tensor, scales: torch.Tensor, tau: float) -> torch.Tensor:
    """The QP solved in the parameter space by cvxpy (an interior-point method)."""
    cp = pytest.importorskip("cvxpy")
    g = (J * scales[:, None]).numpy()
    d = cp.Variable(J.shape[1])
    constraints = [g[j] @ d >= tau * float(g[j] @ g[j]) for j in range(1, J.shape[0])]
    cp.Problem(cp.Minimize(0.5 * cp.sum_squares(d - g[0])), constraints).solve()
    direction = torch.tensor(d.value)
    return direction * (J[0].norm() / direction.norm())


@pytest.mark.parametrize("seed", range(6))
def test_first_call_matches_an_interior_point_solution(seed):
    g = torch.Generator().manual_seed(seed)
    J = torch.randn(4, 6, generator=g, dtype=torch.float64)
    tau = 0.3
    weights = PCDWeighting(tau=tau, beta=0.9, eps=0.0)(J @ J.T)
    # First call: the debiased average is ‖gᵢ‖² itself.
    expected = _qp_reference(J, 1 / J.norm(dim=1), tau)
    torch.testing.assert_close(weights @ J, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(20))
def test_matches_torchjd_over_several_calls(seed):
    g = torch.Generator().manual_seed(seed)
    m = int(torch.randint(2, 6, (), generator=g))
    n = int(torch.randint(1, 8, (), generator=g))  # n < m: rank-deficient Gramians too
    tau = torch.rand(m - 1, generator=g, dtype=torch.float64) * 0.5
    ours = PCDWeighting(tau=tau, beta=0.9)
    theirs = torchjd_aggregation.PCDWeighting(tau=tau, beta=0.9)
    for _ in range(3):
        J = torch.randn(m, n, generator=g, dtype=torch.float64)
        G = J @ J.T
        torch.testing.assert_close(ours(G) @ J, theirs(G) @ J, atol=1e-8, rtol=1e-6)


def test_state_dict_resumes_the_same_trajectory():
    g = torch.Generator().manual_seed(0)
    jacobians = [torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(5)]
    straight = PCD(tau=0.2, beta=0.8)
    expected = [straight(J) for J in jacobians]
    first = PCD(tau=0.2, beta=0.8)
    for J in jacobians[:2]:
        first(J)
    resumed = PCD(tau=0.2, beta=0.8)
    resumed.load_state_dict(first.state_dict())
    for J, want in zip(jacobians[2:], expected[2:]):
        torch.testing.assert_close(resumed(J), want)
    resumed.reset()
    torch.testing.assert_close(resumed(jacobians[0]), expected[0])


def test_errors():
    with pytest.raises(ValueError, match="tau"):
        PCDWeighting(tau=1.5)
    with pytest.raises(ValueError, match="beta"):
        PCDWeighting(beta=1.0)
    weighting = PCDWeighting(tau=torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="one per secondary"):
        weighting(torch.eye(2))
    weighting = PCDWeighting()
    weighting(torch.eye(3))
    with pytest.raises(ValueError, match="reset"):
        weighting(torch.eye(2))


def test_output_has_no_grad_fn():
    J = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert PCD()(J).grad_fn is None
    G = (J @ J.T).detach().requires_grad_()
    assert PCDWeighting()(G).grad_fn is None
