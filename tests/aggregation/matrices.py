"""Families of sampled Jacobians for property tests of aggregators and weightings."""

from __future__ import annotations

import torch
from torch import Tensor


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def full_rank(m: int, n: int, seed: int = 0) -> Tensor:
    return torch.randn(m, n, generator=_generator(seed), dtype=torch.float64)


def rank_deficient(m: int, n: int, rank: int, seed: int = 0) -> Tensor:
    g = _generator(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64
    )


def with_zero_row(m: int, n: int, seed: int = 0) -> Tensor:
    matrix = full_rank(m, n, seed)
    matrix[m // 2] = 0.0
    return matrix


def with_duplicated_row(m: int, n: int, seed: int = 0) -> Tensor:
    matrix = full_rank(m, n, seed)
    matrix[-1] = matrix[0]
    return matrix


def scaled(m: int, n: int, seed: int = 0) -> Tensor:
    """Rows of wildly different norms (1e-3 … 1e3)."""
    matrix = full_rank(m, n, seed)
    return matrix * torch.logspace(-3, 3, m, dtype=torch.float64).unsqueeze(1)


# (name, matrix) pairs covering m > n, m = 1, rank deficiency, zero/duplicated rows and scaling.
MATRICES: list[tuple[str, Tensor]] = [
    ("full_rank_3x10", full_rank(3, 10, 1)),
    ("full_rank_5x5", full_rank(5, 5, 2)),
    ("tall_8x4", full_rank(8, 4, 3)),
    ("single_1x7", full_rank(1, 7, 4)),
    ("rank2_6x9", rank_deficient(6, 9, 2, 5)),
    ("zero_row_4x6", with_zero_row(4, 6, 6)),
    ("duplicated_4x6", with_duplicated_row(4, 6, 7)),
    ("scaled_5x8", scaled(5, 8, 8)),
]

MATRIX_IDS = [name for name, _ in MATRICES]
MATRIX_VALUES = [matrix for _, matrix in MATRICES]
