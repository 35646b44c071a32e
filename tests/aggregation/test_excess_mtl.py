"""ExcessMTL (He et al., 2024) against a naive loop re-derivation of its weight update."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import ExcessMTL

from .matrices import full_rank


def naive_excess_mtl(matrices: list[Tensor], step_size: float, eps: float) -> list[Tensor]:
    m, n = matrices[0].shape
    sums = [[0.0] * n for _ in range(m)]
    weights = [1.0] * m
    initial: list[float] | None = None
    outputs = []
    for matrix in matrices:
        risks = []
        for i in range(m):
            risk = 0.0
            for k in range(n):
                value = float(matrix[i, k])
                sums[i][k] += value * value
                risk += value * value / math.sqrt(sums[i][k] + eps)
            risks.append(risk)
        if initial is None:
            initial = risks
        else:
            weights = [
                w * math.exp(step_size * r / r0) for w, r, r0 in zip(weights, risks, initial)
            ]
            total = sum(weights)
            weights = [m * w / total for w in weights]
        outputs.append(torch.tensor(weights, dtype=torch.float64) @ matrix)
    return outputs


@pytest.mark.parametrize("step_size", [1e-2, 0.5])
def test_trajectory_matches_naive_loop(step_size: float) -> None:
    matrices = [full_rank(3, 5, 110 + t) * (1.0 + t) for t in range(5)]
    aggregator = ExcessMTL(robust_step_size=step_size)
    expected = naive_excess_mtl(matrices, step_size, 1e-7)
    for matrix, target in zip(matrices, expected, strict=True):
        torch.testing.assert_close(aggregator(matrix), target, rtol=1e-10, atol=1e-10)


def test_first_call_is_the_sum_and_stationary_gradients_keep_equal_weights() -> None:
    # With the same J twice, every risk ratio is ≈ 1/√2, so the weights stay equal (= 1).
    matrix = full_rank(3, 4, 120)
    aggregator = ExcessMTL(robust_step_size=0.7)
    torch.testing.assert_close(aggregator(matrix), matrix.sum(dim=0))
    # (equal up to ε = 1e-7 in the square roots)
    torch.testing.assert_close(aggregator(matrix), matrix.sum(dim=0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(aggregator.weights, torch.ones(3).double(), rtol=0, atol=1e-6)


def test_state_dict_round_trip_and_reset() -> None:
    matrices = [full_rank(3, 4, 130 + t) * (t + 1) for t in range(5)]
    reference = ExcessMTL(0.3)
    outputs = [reference(x) for x in matrices]
    aggregator = ExcessMTL(0.3)
    for x in matrices[:2]:
        aggregator(x)
    restored = ExcessMTL(0.3)
    restored.load_state_dict(aggregator.state_dict())
    for x, expected in zip(matrices[2:], outputs[2:], strict=True):
        torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)
    restored.reset()
    assert restored.weights is None
    torch.testing.assert_close(restored(matrices[0]), outputs[0], rtol=0, atol=0)


def test_zero_first_gradient_is_not_divided_by() -> None:
    first = full_rank(3, 4, 140)
    first[1] = 0.0
    aggregator = ExcessMTL(0.5)
    aggregator(first)
    output = aggregator(full_rank(3, 4, 141))
    assert torch.isfinite(output).all()


def test_shape_change_and_bad_hyperparameters() -> None:
    aggregator = ExcessMTL()
    aggregator(full_rank(3, 4))
    with pytest.raises(ValueError, match="reset"):
        aggregator(full_rank(3, 5))
    for kwargs in [{"robust_step_size": 0.0}, {"eps": -1.0}]:
        with pytest.raises(ValueError):
            ExcessMTL(**kwargs)


def test_non_differentiable() -> None:
    assert ExcessMTL()(full_rank(2, 3).requires_grad_()).grad_fn is None


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float32, 1e30), (torch.float32, 1e-30)])
def test_extreme_scales_follow_the_naive_float64_loop(dtype: torch.dtype, scale: float) -> None:
    """Squares of 1e30 overflow float32 (the accumulated S became inf and the weights NaN) and
    squares of 1e-30 underflow (zero risks): the trajectory must match the float64 loop."""
    matrices = [(full_rank(3, 5, 150 + t) * (1.0 + t) * scale).to(dtype) for t in range(4)]
    aggregator = ExcessMTL(robust_step_size=0.5)
    expected = naive_excess_mtl([x.double() for x in matrices], 0.5, 1e-7)
    for matrix, target in zip(matrices, expected, strict=True):
        output = aggregator(matrix)
        assert output.dtype == dtype and torch.isfinite(output).all()
        torch.testing.assert_close(output.double() / scale, target / scale, rtol=1e-5, atol=0)


def test_large_risk_ratios_do_not_overflow_the_weights() -> None:
    """A first step of tiny gradients then huge ones: ``exp(η e/e¹)`` overflows float64, the
    log-domain update does not (the huge loss takes all the weight, ``m`` in total)."""
    first = full_rank(3, 4, 160) * torch.tensor([[1.0], [1e-150], [1.0]], dtype=torch.float64)
    aggregator = ExcessMTL(robust_step_size=1.0)
    aggregator(first)
    output = aggregator(full_rank(3, 4, 161))
    assert torch.isfinite(output).all()
    torch.testing.assert_close(aggregator.weights, torch.tensor([0.0, 3.0, 0.0]).double())


def test_checkpoint_of_squared_sums_loads() -> None:
    """A checkpoint written before the root sums (key ``squared_sums``) resumes the same
    trajectory."""
    matrices = [full_rank(3, 4, 170 + t) for t in range(3)]
    reference = ExcessMTL(0.3)
    outputs = [reference(x) for x in matrices]
    aggregator = ExcessMTL(0.3)
    aggregator(matrices[0])
    state = aggregator.get_extra_state()
    legacy = dict(state, squared_sums=state.pop("root_sums") ** 2)
    restored = ExcessMTL(0.3)
    restored.set_extra_state(legacy)
    for x, expected in zip(matrices[1:], outputs[1:], strict=True):
        torch.testing.assert_close(restored(x), expected, rtol=1e-14, atol=0)
