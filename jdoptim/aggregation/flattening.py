r"""Flattening: a weighting of a *generalized* Gramian, for losses arranged as a tensor.

For losses ``ℓ`` of shape ``[m₁, …, m_k]`` (e.g. ``[batch, tasks]``), the generalized Gramian has
shape ``[m₁, …, m_k, m_k, …, m₁]`` with

.. math::  G[a_1, …, a_k, c_k, …, c_1] = ⟨∇ℓ_{a_1…a_k}, ∇ℓ_{c_1…c_k}⟩

(the second index is written reversed, as in ``J Jᵀ`` for a tensor-shaped ``J``). ``Flattening(W)``
reads it as the ordinary ``N × N`` Gramian of the ``N = ∏ mᵢ`` losses in row-major order, applies
the weighting ``W`` and returns the ``N`` weights in the shape ``[m₁, …, m_k]``:
``Flattening(W)(G) = W(flatten(G)).reshape(m₁, …, m_k)``. For ``k = 1`` it is ``W`` itself.
The reshapes themselves are numerics (:mod:`jdoptim.linalg.gramian`), re-exported here.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..linalg.gramian import flatten_gramian, generalize_gramian
from ._bases import Weighting

__all__ = ["Flattening", "flatten_gramian", "generalize_gramian"]


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
