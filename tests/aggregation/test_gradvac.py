"""GradVac against a naive loop re-derivation of Algorithm 1 of Wang et al. (2021) on J."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import GradVac, GradVacWeighting
from jdoptim.aggregation.gradvac import _gradvac_coefficients

from .matrices import full_rank, with_zero_row


def naive_gradvac_step(
    matrix: Tensor, targets: Tensor, beta: float, reduction: str = "sum"
) -> tuple[Tensor, Tensor]:
    """One GradVac step in index order; returns ``d`` and the updated target similarities."""
    m = matrix.shape[0]
    targets = targets.clone()
    corrected = []
    for i in range(m):
        g = matrix[i].clone()
        for j in range(m):
            if j == i:
                continue
            norm_i, norm_j = g.norm(), matrix[j].norm()
            if norm_i == 0 or norm_j == 0:
                continue
            phi = float(g @ matrix[j] / (norm_i * norm_j))
            target = float(targets[i, j])
            if phi < target:
                coefficient = (
                    norm_i
                    * (target * math.sqrt(1 - phi**2) - phi * math.sqrt(1 - target**2))
                    / (norm_j * math.sqrt(1 - target**2))
                )
                g = g + coefficient * matrix[j]
            targets[i, j] = (1 - beta) * target + beta * phi
        corrected.append(g)
    total = torch.stack(corrected).sum(dim=0)
    return (total / m if reduction == "mean" else total), targets


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("beta", [0.01, 0.3, 1.0])
def test_fixed_order_trajectory_matches_naive_loop(beta: float, reduction: str) -> None:
    aggregator = GradVac(beta=beta, reduction=reduction, order="fixed")
    targets = torch.zeros(4, 4, dtype=torch.float64)
    for step in range(4):
        matrix = full_rank(4, 6, seed=20 + step)
        expected, targets = naive_gradvac_step(matrix, targets, beta, reduction)
        torch.testing.assert_close(aggregator(matrix), expected, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(aggregator.weighting.target_similarities, targets)


def test_zero_row_is_neither_corrected_nor_tracked() -> None:
    matrix = with_zero_row(4, 5, seed=21)
    aggregator = GradVac(beta=0.5, order="fixed")
    targets = torch.zeros(4, 4, dtype=torch.float64)
    for _ in range(3):
        expected, targets = naive_gradvac_step(matrix, targets, 0.5)
        torch.testing.assert_close(aggregator(matrix), expected, rtol=1e-9, atol=1e-9)
    assert (aggregator.weighting.target_similarities[2] == 0).all()
    assert (aggregator.weighting.target_similarities[:, 2] == 0).all()


@pytest.mark.parametrize("target", [-0.3, 0.0, 0.4, 0.9])
def test_correction_reaches_the_target_cosine(target: float) -> None:
    # Two gradients at cosine -0.5: after the correction, cos(g_1', g_2) is exactly the target.
    matrix = torch.tensor(
        [[1.0, 0.0], [-0.5, math.sqrt(3) / 2]], dtype=torch.float64
    ) * torch.tensor([[2.0], [3.0]], dtype=torch.float64)
    gramian = matrix @ matrix.T
    orders = torch.tensor([[0, 1], [0, 1]])
    targets = torch.full((2, 2), target, dtype=torch.float64)
    coefficients, new_targets = _gradvac_coefficients(gramian, orders, targets, beta=0.25)
    corrected = coefficients[0] @ matrix
    cosine = corrected @ matrix[1] / (corrected.norm() * matrix[1].norm())
    torch.testing.assert_close(cosine, torch.tensor(target, dtype=torch.float64))
    # The EMA moves towards the cosine measured before the correction, -0.5.
    torch.testing.assert_close(new_targets[0, 1], torch.tensor(0.75 * target - 0.125).double())


def test_first_step_removes_conflicts_like_pcgrad() -> None:
    # φ̂ = 0 at the first step: g_1 = (1, 0), g_2 = (-1, 1) give (1/2, 1/2) + (0, 1).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(GradVac(seed=0)(matrix), torch.tensor([0.5, 1.5]).double())


def test_random_order_is_seeded_and_checkpointed() -> None:
    matrices = [full_rank(4, 3, seed=30 + k) for k in range(6)]
    reference = GradVac(beta=0.5, seed=5)
    outputs = [reference(x) for x in matrices]
    aggregator = GradVac(beta=0.5, seed=5)
    for x in matrices[:3]:
        aggregator(x)
    state = aggregator.state_dict()
    restored = GradVac(beta=0.5, seed=99)
    restored.load_state_dict(state)
    for x, expected in zip(matrices[3:], outputs[3:], strict=True):
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    aggregator.reset()  # back to the state at construction (seed 5)
    assert aggregator.weighting.target_similarities is None
    for x, expected in zip(matrices, outputs, strict=True):
        torch.testing.assert_close(aggregator(x), expected, rtol=0, atol=0)


def test_random_order_changes_the_result() -> None:
    matrix = full_rank(3, 3, seed=11)
    outputs = {tuple(GradVac(seed=s)(matrix).tolist()) for s in range(12)}
    assert len(outputs) > 1


def test_number_of_losses_cannot_change_silently() -> None:
    aggregator = GradVac(seed=0)
    aggregator(full_rank(3, 4))
    with pytest.raises(ValueError, match="reset"):
        aggregator(full_rank(4, 4))
    aggregator.reset()
    aggregator(full_rank(4, 4))


def test_weighting_is_non_differentiable() -> None:
    matrix = full_rank(3, 4).requires_grad_()
    assert GradVacWeighting(seed=0)(matrix @ matrix.T).grad_fn is None


@pytest.mark.parametrize(
    "kwargs", [{"beta": -0.1}, {"beta": 1.5}, {"reduction": "max"}, {"order": "reverse"}]
)
def test_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GradVac(**kwargs)
