"""Random loss weighting (RLW, Lin et al., 2022): w = softmax(λ̃), λ̃ ~ N(0, I)."""

from __future__ import annotations

import math

import torch

from jdoptim.aggregation import Random, RandomWeighting

from .matrices import full_rank


def test_weights_on_the_simplex_and_direction() -> None:
    weighting = RandomWeighting(seed=0)
    for m in [1, 3, 10]:
        weights = weighting(torch.eye(m, dtype=torch.float64))
        assert (weights > 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    matrix = full_rank(4, 5, 100)
    a, b = Random(seed=3), RandomWeighting(seed=3)
    torch.testing.assert_close(a(matrix), b(matrix @ matrix.T) @ matrix)


def test_distribution_of_log_weight_ratios() -> None:
    # log(w_1 / w_2) = λ̃_1 - λ̃_2 ~ N(0, 2): check its mean, variance and a tail probability.
    weighting = RandomWeighting(seed=1)
    gramian = torch.eye(2, dtype=torch.float64)
    samples = torch.stack([weighting(gramian) for _ in range(4000)])
    log_ratios = (samples[:, 0] / samples[:, 1]).log()
    assert abs(log_ratios.mean().item()) < 0.1  # sd of the mean: √(2/4000) ≈ 0.022
    assert abs(log_ratios.var().item() - 2.0) < 0.2  # sd of the variance: 2√(2/3999) ≈ 0.045
    tail = (log_ratios > math.sqrt(2.0)).double().mean().item()  # P(N(0,1) > 1) ≈ 0.1587
    assert abs(tail - 0.1587) < 0.025


def test_seeded_reset_and_state_dict_round_trip() -> None:
    gramian = torch.eye(5, dtype=torch.float64)
    reference = RandomWeighting(seed=11)
    outputs = [reference(gramian) for _ in range(4)]
    assert not torch.equal(outputs[0], outputs[1])
    weighting = RandomWeighting(seed=11)
    weighting(gramian)
    restored = RandomWeighting(seed=12)
    restored.load_state_dict(weighting.state_dict())
    for expected in outputs[1:]:
        torch.testing.assert_close(restored(gramian), expected, rtol=0, atol=0)
    reference.reset()
    torch.testing.assert_close(reference(gramian), outputs[0], rtol=0, atol=0)


def test_non_differentiable() -> None:
    assert Random(seed=0)(full_rank(3, 2).requires_grad_()).grad_fn is None
