r"""Flattening: a weighting of a *generalized* Gramian, for losses arranged as a tensor.

For losses ``ℓ`` of shape ``[m₁, …, m_k]`` (e.g. ``[batch, tasks]``), the generalized Gramian has
shape ``[m₁, …, m_k, m_k, …, m₁]`` with

.. math::  G[a_1, …, a_k, c_k, …, c_1] = ⟨∇ℓ_{a_1…a_k}, ∇ℓ_{c_1…c_k}⟩

(the second index is written reversed, as in ``J Jᵀ`` for a tensor-shaped ``J``). ``Flattening(W)``
reads it as the ordinary ``N × N`` Gramian of the ``N = ∏ mᵢ`` losses in row-major order, applies
the weighting ``W`` and returns the ``N`` weights in the shape ``[m₁, …, m_k]``:
``Flattening(W)(G) = W(flatten(G)).reshape(m₁, …, m_k)``. For ``k = 1`` it is ``W`` itself.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from ._bases import Weighting

__all__ = ["Flattening", "flatten_gramian", "generalize_gramian"]


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


class Flattening(nn.Module):
    """Generalized weighting ``G ↦ W(flatten(G)).reshape(m₁, …, m_k)``; see the module docs.

    Args:
        weighting: the :class:`~jdoptim.aggregation.Weighting` applied to the flattened Gramian.
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        if not isinstance(weighting, Weighting):
            raise TypeError(f"Flattening wraps a Weighting, got {type(weighting).__name__}.")
        self.weighting = weighting

    def forward(self, generalized_gramian: Tensor) -> Tensor:
        k = generalized_gramian.dim() // 2
        shape = tuple(generalized_gramian.shape[:k])
        return self.weighting(flatten_gramian(generalized_gramian)).reshape(shape)

    def __repr__(self) -> str:
        return f"Flattening({self.weighting!r})"
