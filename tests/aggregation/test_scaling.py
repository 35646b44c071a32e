"""The power of two that scale-free methods divide their inputs by
(``jdoptim.aggregation._scaling.power_of_two_exponent``), read as Python floats for small
tensors and by tensor operations for large ones: both give ``frexp``'s exponent of ``max|x|``."""

from __future__ import annotations

import math

import pytest
import torch

from jdoptim.aggregation import _scaling
from jdoptim.aggregation._scaling import power_of_two_exponent


def _expected(values: list[float]) -> int:
    if not values or not all(math.isfinite(v) for v in values):
        return 0
    top = max(abs(v) for v in values)
    return math.frexp(top)[1] if top > 0.0 else 0


CASES = {
    "ones": [1.0, 1.0, 1.0, 1.0],
    "just below a power": [0.999, -0.5],
    "exactly a power": [-4.0, 2.0],
    "tiny": [3e-30, -1e-31],
    "huge": [-3e30, 1.0],
    "zeros": [0.0, 0.0],
    "nan": [1.0, float("nan"), 2.0],
    "nan first": [float("nan"), 1.0],
    "inf": [1.0, float("-inf")],
    "empty": [],
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("large", [False, True])
def test_exponent_of_the_largest_magnitude(case, dtype, large, monkeypatch):
    if large:  # the tensor-operation path
        monkeypatch.setattr(_scaling, "_READ_AS_FLOATS_UP_TO", -1)
    tensor = torch.tensor(CASES[case], dtype=dtype)
    values = tensor.double().tolist()  # (the values as the dtype holds them)
    assert power_of_two_exponent(tensor) == _expected(values)
    if tensor.numel():
        square = tensor.reshape(1, -1).expand(tensor.numel(), -1)  # (a non-contiguous view)
        assert power_of_two_exponent(square) == _expected(values)
