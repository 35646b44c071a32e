r"""Gramians from Jacobian blocks, and the reshapes of a generalized Gramian.

**Accumulation.** For Jacobian blocks ``J_p`` (one per parameter ``p``, with ``R`` rows each,
``[R, *p.shape]`` or any shape that flattens to ``R`` rows), the Gramian of the concatenated
Jacobian is the sum of the blocks' Gramians,

.. math::  G = J Jᵀ = \sum_p J_p J_pᵀ ,

so the ``[R, n]`` Jacobian ``J`` is never concatenated: each term is one ``[R, n_p] × [n_p, R]``
product (:func:`gramian_of_blocks`).

**Generalized Gramian.** For losses of shape ``[m₁, …, m_k]``, the generalized Gramian has shape
``[m₁, …, m_k, m_k, …, m₁]`` with ``G[a₁…a_k, c_k…c₁] = ⟨∇ℓ_{a₁…a_k}, ∇ℓ_{c₁…c_k}⟩`` (the second
index written reversed, as in ``J Jᵀ`` for a tensor-shaped ``J``). :func:`flatten_gramian` reads
it as the ``N × N`` Gramian of the ``N = ∏ mᵢ`` losses in row-major order, and
:func:`generalize_gramian` is its inverse.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["flatten_gramian", "generalize_gramian", "gram_matrix", "gramian_of_blocks"]

#: Columns per partial sum in :func:`gram_matrix`.
GRAM_COLUMN_BLOCK = 4096


def gram_matrix(flat: Tensor) -> Tensor:
    """``A Aᵀ`` for ``A`` of shape ``[R, n]``, as the sum of the products of column blocks of
    :data:`GRAM_COLUMN_BLOCK` columns.

    One product of a few rows over many columns accumulates each entry in one running float32
    sum. Measured on CPU against float64: relative error 1.3e-3 over 11M columns (2 rows),
    1e-4 over 2M, 6.5e-6 over 107k (8 rows); summing the blocks' products instead, 2e-8 to
    1.5e-7, at the same speed. The blocks are one batched product (``[n / 4096, R, R]`` partial
    Gram matrices, summed) where those partial matrices are no larger than ``A``, else one
    product per block.
    """
    rows, n = flat.shape
    block = GRAM_COLUMN_BLOCK
    if n <= block:
        return flat @ flat.T
    full = n - n % block
    if rows <= block:
        blocks = flat[:, :full].unflatten(1, (full // block, block)).transpose(0, 1)
        total = torch.bmm(blocks, blocks.transpose(1, 2)).sum(0)
    else:
        total = flat[:, :block] @ flat[:, :block].T
        for start in range(block, full, block):
            total.add_(flat[:, start : start + block] @ flat[:, start : start + block].T)
    if full < n:
        total.add_(flat[:, full:] @ flat[:, full:].T)
    return total


def gramian_of_blocks(blocks: Iterable[Tensor], rows: int | None = None) -> Tensor:
    """``G = Σ_p J_p J_pᵀ`` (``[R, R]``) for Jacobian blocks of ``R`` rows each.

    Args:
        blocks: at least one block; each is read as ``[R, -1]``.
        rows: ``R``; by default the first dimension of each block (``[R, *p.shape]`` blocks).
    """
    gramian = None
    for block in blocks:
        flat = block.reshape(block.shape[0] if rows is None else rows, -1)
        term = gram_matrix(flat)
        gramian = term if gramian is None else gramian.add_(term)
    if gramian is None:
        raise ValueError("gramian_of_blocks needs at least one Jacobian block, got none.")
    return gramian


def flatten_gramian(gramian: Tensor) -> Tensor:
    """``[m₁..m_k, m_k..m₁]`` → ``[N, N]`` (row-major order of the losses on both sides)."""
    if gramian.dim() % 2:
        raise ValueError(
            f"A generalized Gramian has an even number of dimensions, got shape "
            f"{tuple(gramian.shape)}."
        )
    k = gramian.dim() // 2
    shape = gramian.shape[:k]
    if tuple(gramian.shape[k:]) != tuple(reversed(shape)):
        raise ValueError(
            f"A generalized Gramian has shape [m1..mk, mk..m1], got {tuple(gramian.shape)}."
        )
    order = list(range(k)) + list(range(2 * k - 1, k - 1, -1))
    count = math.prod(shape)
    return gramian.permute(order).reshape(count, count)


def generalize_gramian(gramian: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``[N, N]`` → ``[m₁..m_k, m_k..m₁]`` for losses of shape ``shape`` (the inverse of
    :func:`flatten_gramian`; a 0-D Gramian for ``shape = ()``)."""
    k = len(shape)
    order = list(range(k)) + list(range(2 * k - 1, k - 1, -1))
    return gramian.reshape((*shape, *shape)).permute(order)
