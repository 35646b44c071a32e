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


# Degenerate families: where methods must stay finite, and continuous where they promise it.


def opposite_rows(m: int, n: int, seed: int = 0) -> Tensor:
    """Row 1 is ``-7`` times row 0 (two exactly opposite gradients), the others random."""
    matrix = full_rank(m, n, seed)
    matrix[1] = -7.0 * matrix[0]
    return matrix


def identical_rows(m: int, n: int, seed: int = 0) -> Tensor:
    """Every row equal to the same random vector."""
    return full_rank(1, n, seed).expand(m, n).clone()


def rank_one(m: int, n: int, seed: int = 0) -> Tensor:
    """Rows ``aᵢ v`` with coefficients ``aᵢ`` of both signs."""
    g = _generator(seed)
    coefficients = torch.randn(m, 1, generator=g, dtype=torch.float64)
    coefficients[0] = coefficients[0].abs() + 0.5
    coefficients[-1] = -(coefficients[-1].abs() + 0.5)
    return coefficients * torch.randn(1, n, generator=g, dtype=torch.float64)


def ill_conditioned(m: int, n: int, seed: int = 0) -> Tensor:
    """Singular values spread over six orders of magnitude (``1 … 1e-6``)."""
    g = _generator(seed)
    k = min(m, n)
    left = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))[0]
    return left @ torch.diag(torch.logspace(0, -6, k, dtype=torch.float64)) @ right.T


DEGENERATE: list[tuple[str, Tensor]] = [
    ("zero_row_4x6", with_zero_row(4, 6, 6)),
    ("duplicated_4x6", with_duplicated_row(4, 6, 7)),
    ("opposite_4x6", opposite_rows(4, 6, 9)),
    ("opposite_2x5", opposite_rows(2, 5, 10)),
    ("identical_4x5", identical_rows(4, 5, 11)),
    ("rank_one_5x4", rank_one(5, 4, 12)),
    ("single_1x7", full_rank(1, 7, 4)),
    ("column_5x1", full_rank(5, 1, 13)),
]


# Stationarity families (Quinton & Rey 2024's definitions): J is *strongly stationary* when
# Jᵀw = 0 for some w > 0, *weakly stationary* when Jᵀw = 0 for some w ≥ 0, w ≠ 0.


def _orthonormal_complement(basis: Tensor, g: torch.Generator) -> Tensor:
    """An orthonormal basis of the orthogonal complement of the orthonormal columns ``basis``."""
    m, k = basis.shape
    sample = torch.randn(m, m - k, generator=g, dtype=torch.float64)
    return torch.linalg.qr(sample - basis @ (basis.T @ sample))[0]


def _with_left_null_vectors(null: Tensor, n: int, rank: int, g: torch.Generator) -> Tensor:
    """A random ``[m, n]`` matrix of rank ``rank`` whose columns are orthogonal to ``null``."""
    basis = torch.linalg.qr(null)[0]
    left = _orthonormal_complement(basis, g)[:, :rank]
    right = torch.linalg.qr(torch.randn(n, rank, generator=g, dtype=torch.float64))[0]
    values = torch.rand(rank, generator=g, dtype=torch.float64) + 0.5
    return left @ torch.diag(values) @ right.T


def strongly_stationary(m: int, n: int, rank: int, seed: int = 0) -> Tensor:
    """``Jᵀw = 0`` for a ``w > 0`` (rank ``≤ m - 1``)."""
    g = _generator(seed)
    w = torch.rand(m, 1, generator=g, dtype=torch.float64) + 0.1
    return _with_left_null_vectors(w, n, rank, g)


def weakly_not_strongly_stationary(m: int, n: int, seed: int = 0) -> Tensor:
    """``Jᵀw = 0`` for a ``w ≥ 0, w ≠ 0`` and for no ``w > 0`` (``m ≥ 3``, rank ``m - 2``).

    The left null space is spanned by ``u ≥ 0`` (zero on the last two rows) and
    ``v = e_{m-1} - e_{m-2}``: ``u`` is a non-negative null vector, and a null vector
    ``a u + b v`` has entries ``b`` and ``-b`` on the last two rows, so it is never positive.
    """
    g = _generator(seed)
    u = torch.zeros(m, 1, dtype=torch.float64)
    u[: m - 2] = torch.rand(m - 2, 1, generator=g, dtype=torch.float64) + 0.1
    v = torch.zeros(m, 1, dtype=torch.float64)
    v[m - 1], v[m - 2] = 1.0, -1.0
    return _with_left_null_vectors(torch.cat([u, v], dim=1), n, m - 2, g)


def not_weakly_stationary(m: int, n: int, rank: int, seed: int = 0) -> Tensor:
    """No ``w ≥ 0, w ≠ 0`` with ``Jᵀw = 0``: every row has a positive product with one
    direction ``x`` (``J x > 0``)."""
    g = _generator(seed)
    matrix = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
        rank, n, generator=g, dtype=torch.float64
    )
    x = torch.randn(n, generator=g, dtype=torch.float64)
    products = matrix @ x
    # Push every row's product with x up to at least 0.5 ‖x‖ along x (rank grows by at most 1).
    shift = (0.5 * x.norm() - products).clamp(min=0.0) / x.norm() ** 2
    return matrix + shift.unsqueeze(1) * x.unsqueeze(0)
