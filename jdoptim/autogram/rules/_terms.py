r"""How a rule's Gramian factors: typed terms shared by the local and the distributed engine.

A rule's Gramian contribution over its parameters is a sum of *terms*
(:meth:`~._base.LayerRule.factorisation`). Each term is a few per-sample *factors* (tensors whose
first dimension indexes the samples) and a contraction that turns them into ``[b, T, b, T]``:

* :class:`KernelTerm`, a layer linear in its weight at every position, ``Y_{is} = W a_{is} + β``
  (``Linear``, transformers' ``Conv1D``, an ungrouped ``Conv`` after im2col). Factors: the inputs
  ``A`` (``a_{is} ∈ R^d``) and the output gradients ``D`` (``D_{k,is} ∈ R^o``);

  .. math::  G[i,k,j,l] = Σ_{s,r} (⟨a_{is}, a_{jr}⟩ + [β]) \, ⟨D_{k,is}, D_{l,jr}⟩,

  i.e. ``⟨A_i A_jᵀ, D_i D_jᵀ⟩`` summed over the positions (``(AAᵀ + 1) ⊙ (DDᵀ)`` for one
  position and one loss per sample);
* :class:`IndexTerm`, a lookup table (``Embedding``): the same with one-hot inputs, so the
  kernel is ``⟨a_{is}, a_{jr}⟩ = [idx_{is} = idx_{jr}]``. Factors: the indices and ``D``;
* :class:`RowsTerm`, explicit rows ``∂ℓ_{ik}/∂p`` (``[b, T, ...]``): ``G = R Rᵀ``. Any rule can
  give these (the default factorisation), as wide as the parameters.

The local engine sums ``term.gramian()``. The distributed engine gathers every term's
:meth:`~GramianTerm.factors` along the sample dimension from all processes, rebuilds the term
from the gathered factors (:meth:`~GramianTerm.from_factors`) and takes its Gramian: the
cross-process blocks need only the others' factors, ``S(d + o)`` numbers per sample for a kernel
term instead of ``o d`` for its rows. A term may offer a narrower equivalent to gather
(:meth:`~GramianTerm.exchanged`: a kernel term whose rows are narrower than its factors gathers
its rows).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ._contraction import (
    bias_rows,
    gramian_from_kernel,
    linear_gramian,
    linear_rows,
    per_sample_gramian,
    rows_gramian,
    takes_contraction,
)
from ._index_pairs import pairs_gramian_if_cheaper

__all__ = ["GramianTerm", "IndexTerm", "KernelTerm", "RowsTerm"]


class GramianTerm(ABC):
    """One additive piece of a rule's Gramian contribution, given by per-sample factors."""

    #: what the term is, as statistics and messages name it
    kind: ClassVar[str]

    @abstractmethod
    def gramian(self) -> Tensor:
        """The term's contribution ``G[i, k, j, l]`` as ``[b, T, b, T]``."""

    @abstractmethod
    def factors(self) -> list[Tensor]:
        """The tensors the term is computed from, each with the samples first (``[b, ...]``)."""

    @abstractmethod
    def from_factors(self, factors: list[Tensor]) -> GramianTerm:
        """The same kind of term on other factors (laid out as :meth:`factors`), e.g. those of
        every process concatenated along the samples."""

    def exchanged(self) -> list[GramianTerm]:
        """The terms to gather across processes in this one's place (same Gramian, fewer
        numbers per sample); by default the term itself."""
        return [self]

    def forms_rows(self) -> bool:
        """Whether :meth:`gramian` forms the explicit rows of the parameters it covers."""
        return False


@dataclass(eq=False)
class RowsTerm(GramianTerm):
    """Explicit rows ``R[i, k] = ∂ℓ_{ik}/∂p`` (``[b, T, ...]``): ``G = R Rᵀ``."""

    rows: Tensor
    kind: ClassVar[str] = "rows"

    @classmethod
    def per_loss(cls, rows: Tensor) -> RowsTerm:
        """Rows ``[b, T, ...]`` with ``b = 1`` or ``T = 1`` as one "sample" per loss
        (``[bT, 1, width]``), so that they gather along the losses."""
        count = rows.shape[0] * rows.shape[1]
        return cls(rows.reshape(count, 1, -1))

    def gramian(self) -> Tensor:
        return rows_gramian(self.rows)

    def forms_rows(self) -> bool:
        return True

    def factors(self) -> list[Tensor]:
        return [self.rows]

    def from_factors(self, factors: list[Tensor]) -> RowsTerm:
        (rows,) = factors
        return RowsTerm(rows)


@dataclass(eq=False)
class KernelTerm(GramianTerm):
    r"""A layer linear in its weight at every position, ``Y_{is} = W a_{is} (+ β)``.

    ``inputs`` is ``A`` as ``[b, S, d]`` and ``grads`` is ``D`` as ``[T, b, S, o]``; or, for one
    position and one loss per sample, ``[b, d]`` and ``[b, o]`` (then
    ``G = (AAᵀ + [β]) ⊙ (DDᵀ)`` in three products). ``weight``/``bias``: which of the layer's
    weight and bias the term covers (the bias is a weight on a constant input ``1``, folded into
    the same contraction). The contraction or the explicit rows are chosen by cost
    (:func:`~._contraction.linear_gramian`).
    """

    inputs: Tensor
    grads: Tensor
    weight: bool = True
    bias: bool = False
    kind: ClassVar[str] = "kernel"

    @property
    def flat(self) -> bool:
        """Whether the term is in the one-position, one-loss-per-sample layout."""
        return self.inputs.dim() == 2

    def gramian(self) -> Tensor:
        if not self.weight:
            return rows_gramian(self._bias_rows())
        if self.flat:
            return per_sample_gramian(self.inputs, self.grads, self.bias)
        return linear_gramian(self.inputs, self.grads, with_bias=self.bias)

    def _bias_rows(self) -> Tensor:
        return self.grads.unsqueeze(1) if self.flat else bias_rows(self.grads)

    def forms_rows(self) -> bool:
        """For the bias alone, or when :func:`~._contraction.linear_gramian` takes the
        explicit rows (never in the one-position layout, whose three ``b × b`` products form
        no row)."""
        if not self.weight:
            return True
        if self.flat:
            return False
        t, b, s, o = self.grads.shape
        return not takes_contraction(b, s, t, self.inputs.shape[-1] + self.bias, o)

    def rows(self) -> list[Tensor]:
        """The explicit rows ``[b, T, o, d]`` of the weight and ``[b, T, o]`` of the bias (those
        the term covers): ``g_{ik} = Σ_s D_{k,is} a_{is}ᵀ``."""
        rows = []
        if self.weight:
            if self.flat:
                rows.append((self.grads[:, :, None] * self.inputs[:, None, :]).unsqueeze(1))
            else:
                rows.append(linear_rows(self.inputs, self.grads))
        if self.bias:
            rows.append(self._bias_rows())
        return rows

    def factors(self) -> list[Tensor]:
        if self.flat:
            return [self.inputs, self.grads]
        return [self.inputs, self.grads.transpose(0, 1)]

    def from_factors(self, factors: list[Tensor]) -> KernelTerm:
        inputs, grads = factors
        if not self.flat:
            grads = grads.transpose(0, 1)
        return KernelTerm(inputs, grads, self.weight, self.bias)

    def exchanged(self) -> list[GramianTerm]:
        """The factors when they are no wider per sample than the weight's rows
        (``S (d + o) ≤ o d``), else the rows."""
        s = 1 if self.flat else self.inputs.shape[1]
        d, o = self.inputs.shape[-1], self.grads.shape[-1]
        if self.weight and s * (d + o) <= o * d:
            return [self]
        return [RowsTerm(rows) for rows in self.rows()]


@dataclass(eq=False)
class IndexTerm(GramianTerm):
    r"""A lookup table ``Y_{is} = W[idx_{is}]`` (``Embedding``): a Linear layer on one-hot inputs,
    so ``G[i,k,j,l] = Σ_{s,r} [idx_{is} = idx_{jr}] ⟨D_{k,is}, D_{l,jr}⟩``.

    ``index`` is ``[b, S]`` (integers), ``grads`` is ``D`` as ``[T, b, S, e]``, zero at positions
    whose row receives no gradient (a padding index).
    """

    index: Tensor
    grads: Tensor
    kind: ClassVar[str] = "index"

    def gramian(self) -> Tensor:
        pairs = pairs_gramian_if_cheaper(self.index, self.grads)  # (see ._index_pairs)
        if pairs is not None:
            return pairs
        flat = self.index.reshape(-1)
        kernel = (flat[:, None] == flat[None, :]).to(self.grads.dtype)
        b, s = self.index.shape
        return gramian_from_kernel(kernel.view(b, s, b, s), self.grads)

    def factors(self) -> list[Tensor]:
        return [self.index, self.grads.transpose(0, 1)]

    def from_factors(self, factors: list[Tensor]) -> IndexTerm:
        index, grads = factors
        return IndexTerm(index, grads.transpose(0, 1))
