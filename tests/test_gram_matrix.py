"""``jdoptim.linalg.gramian.gram_matrix``: ``A Aᵀ`` summed over column blocks, exact on every
shape and accurate in float32 where one product over many columns is not."""

from __future__ import annotations

import pytest
import torch

import jdoptim.linalg.gramian as gramian_module
from jdoptim.linalg.gramian import gram_matrix

BLOCK = 8  # (the block size these shapes are written for, set in the test)


@pytest.mark.parametrize(
    "rows, columns",
    [(3, 10), (3, BLOCK), (3, 2 * BLOCK), (5, 3 * BLOCK + 17), (BLOCK + 1, BLOCK + 3)],
    ids=["narrow", "one-block", "two-blocks", "remainder", "many-rows"],
)
def test_equals_the_product(monkeypatch: pytest.MonkeyPatch, rows: int, columns: int) -> None:
    """Every branch (one product, batched blocks, blocks with a remainder, one product per
    block for many rows) against ``A Aᵀ`` in float64; a column slice of a wider matrix too."""
    monkeypatch.setattr(gramian_module, "GRAM_COLUMN_BLOCK", BLOCK)
    torch.manual_seed(0)
    wide = torch.randn(rows, columns + 7, dtype=torch.float64)
    for flat in (wide[:, :columns].contiguous(), wide[:, :columns]):
        assert torch.allclose(gram_matrix(flat), flat @ flat.T, rtol=1e-12, atol=1e-9)


def test_float32_over_millions_of_columns() -> None:
    """Two rows over 2M columns: within 1e-5 of float64, where one float32 product is about
    1e-4 off (the sum of each entry runs over every column)."""
    torch.manual_seed(0)
    flat = torch.randn(2, 2_000_000) * torch.rand(1, 2_000_000)
    expected = flat.double() @ flat.double().T
    error = (gram_matrix(flat).double() - expected).abs().max() / expected.abs().max()
    assert error < 1e-5
