"""Coordinate-wise trimmed mean against a per-coordinate loop over sorted lists."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import TrimmedMean

from .matrices import full_rank


@pytest.mark.parametrize("trim_number", [0, 1, 2, 3])
def test_matches_per_coordinate_loop(trim_number: int) -> None:
    matrix = full_rank(7, 6, 80)
    expected = []
    for k in range(6):
        values = sorted(matrix[:, k].tolist())
        kept = values[trim_number : 7 - trim_number]
        expected.append(sum(kept) / len(kept))
    actual = TrimmedMean(trim_number)(matrix)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float64))


def test_ignores_outliers() -> None:
    matrix = torch.tensor([[1.0, 2.0], [3.0, -1e6], [2.0, 4.0], [1e6, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(TrimmedMean(1)(matrix), torch.tensor([2.5, 2.5]).double())


def test_non_differentiable() -> None:
    assert TrimmedMean(1)(full_rank(3, 2).requires_grad_()).grad_fn is None


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="more than 4"):
        TrimmedMean(2)(full_rank(4, 3))
    for value in [-1, 1.5, True]:
        with pytest.raises(ValueError):
            TrimmedMean(value)  # type: ignore[arg-type]
