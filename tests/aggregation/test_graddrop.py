"""GradDrop (Chen et al., 2020) checked coordinate by coordinate against the paper's rule."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import GradDrop

from .matrices import full_rank


def test_each_coordinate_keeps_one_sign() -> None:
    # Per coordinate, d_k is the sum of the positive entries or the sum of the negative ones.
    matrix = full_rank(4, 200, seed=40)
    output = GradDrop(seed=0)(matrix)
    positive = matrix.clamp(min=0).sum(dim=0)
    negative = matrix.clamp(max=0).sum(dim=0)
    for k in range(matrix.shape[1]):
        assert torch.isclose(output[k], positive[k]) or torch.isclose(output[k], negative[k])
    assert not torch.allclose(output, positive) and not torch.allclose(output, negative)


def test_keep_probability_is_the_sign_purity() -> None:
    # Column (3, -1): P = ½(1 + 2/4) = 0.75, so the positive part is kept with probability 0.75.
    n = 4000
    matrix = torch.tensor([[3.0], [-1.0]], dtype=torch.float64).expand(2, n).contiguous()
    output = GradDrop(seed=1)(matrix)
    kept_positive = (output == 3.0).double().mean().item()
    assert ((output == 3.0) | (output == -1.0)).all()
    assert abs(kept_positive - 0.75) < 0.03  # 4.4 standard deviations


def test_agreeing_signs_keep_everything() -> None:
    matrix = full_rank(3, 50, seed=41).abs() * torch.tensor([[1.0], [2.0], [0.5]]).double()
    matrix[:, ::2] *= -1.0  # columns all positive or all negative: P ∈ {0, 1}
    torch.testing.assert_close(GradDrop(seed=2)(matrix), matrix.sum(dim=0))


def test_leak() -> None:
    matrix = full_rank(3, 100, seed=42)
    torch.testing.assert_close(GradDrop(torch.ones(3).double(), seed=3)(matrix), matrix.sum(0))
    # Leak ½ on every loss: each coordinate is (kept sign) + ½ (dropped sign).
    output = GradDrop(torch.full((3,), 0.5).double(), seed=3)(matrix)
    positive = matrix.clamp(min=0).sum(dim=0)
    negative = matrix.clamp(max=0).sum(dim=0)
    a, b = positive + 0.5 * negative, negative + 0.5 * positive
    assert (torch.isclose(output, a) | torch.isclose(output, b)).all()


def test_zero_columns_stay_zero() -> None:
    matrix = full_rank(3, 6, seed=43)
    matrix[:, 2] = 0.0
    output = GradDrop(seed=4)(matrix)
    assert output[2] == 0.0 and torch.isfinite(output).all()


def test_seeded_reset_and_state_dict_round_trip() -> None:
    matrix = full_rank(3, 20, seed=44)
    reference = GradDrop(seed=7)
    outputs = [reference(matrix) for _ in range(4)]
    assert not torch.equal(outputs[0], outputs[1])
    aggregator = GradDrop(seed=7)
    aggregator(matrix)
    restored = GradDrop(seed=8)
    restored.load_state_dict(aggregator.state_dict())
    for expected in outputs[1:]:
        torch.testing.assert_close(restored(matrix), expected, rtol=0, atol=0)
    reference.reset()
    torch.testing.assert_close(reference(matrix), outputs[0], rtol=0, atol=0)


def test_non_differentiable() -> None:
    assert GradDrop(seed=0)(full_rank(2, 3).requires_grad_()).grad_fn is None


def test_bad_leak() -> None:
    with pytest.raises(ValueError, match="one entry per loss"):
        GradDrop(torch.zeros(2))(full_rank(3, 4))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        GradDrop(torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        GradDrop(torch.zeros(2, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_same_seed_same_choices_in_every_dtype(dtype: torch.dtype) -> None:
    """Thresholds are drawn in float64 whatever the dtype: the kept signs are those of the
    float64 call on the same values (float16/bfloat16 come back in their dtype)."""
    matrix = full_rank(4, 300, seed=45).to(dtype)
    output = GradDrop(seed=5)(matrix)
    assert output.dtype == dtype
    expected = GradDrop(seed=5)(matrix.double())
    torch.testing.assert_close(output.double(), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scale", [1e-300, 1e300])
def test_purity_does_not_depend_on_the_scale(scale: float) -> None:
    """``P`` is a ratio: column sums of 1e300-sized entries overflowed (NaN purity)."""
    matrix = full_rank(4, 50, seed=46)
    output = GradDrop(seed=6)(scale * matrix)
    torch.testing.assert_close(output / scale, GradDrop(seed=6)(matrix), rtol=1e-12, atol=0)
