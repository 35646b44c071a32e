"""Constant weighting: d = wᵀJ for a fixed w; differentiable."""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import Constant, ConstantWeighting

from .matrices import full_rank


def test_weights_and_direction() -> None:
    weights = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    matrix = full_rank(3, 4, 90)
    expected = 0.5 * matrix[0] + 2.0 * matrix[1] - matrix[2]
    torch.testing.assert_close(Constant(weights)(matrix), expected)
    torch.testing.assert_close(ConstantWeighting(weights)(matrix @ matrix.T), weights)


def test_differentiable_with_the_expected_gradient() -> None:
    weights = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64)
    matrix = full_rank(3, 4, 91).requires_grad_()
    output = Constant(weights)(matrix)
    assert output.grad_fn is not None
    output.sum().backward()
    torch.testing.assert_close(matrix.grad, weights.unsqueeze(1).expand(3, 4))


def test_weights_are_a_buffer_and_copied() -> None:
    weights = torch.ones(2)
    weighting = ConstantWeighting(weights)
    weights[0] = 5.0
    assert weighting.weights[0] == 1.0
    assert "weights" in weighting.state_dict()


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="one weight per loss"):
        Constant(torch.ones(2))(full_rank(3, 4))
    with pytest.raises(ValueError, match="one weight per loss"):
        ConstantWeighting(torch.ones(2))(torch.eye(3))
    with pytest.raises(ValueError, match="1-D"):
        Constant(torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        Constant(torch.tensor([1.0, float("inf")]))
    with pytest.raises(TypeError):
        Constant(torch.ones(2, dtype=torch.int64))
