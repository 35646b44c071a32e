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

from torch import Tensor

__all__ = ["flatten_gramian", "generalize_gramian", "gramian_of_blocks"]


def gramian_of_blocks(blocks: Iterable[Tensor], rows: int | None = None) -> Tensor:
    """``G = Σ_p J_p J_pᵀ`` (``[R, R]``) for Jacobian blocks of ``R`` rows each.

    Args:
        blocks: at least one block; each is read as ``[R, -1]``.
        rows: ``R``; by default the first dimension of each block (``[R, *p.shape]`` blocks).
    """
    gramian = None
    for block in blocks:
        flat = block.reshape(block.shape[0] if rows is None else rows, -1)
        term = flat @ flat.T
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
