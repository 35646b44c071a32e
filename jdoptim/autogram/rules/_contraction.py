r"""Gramians of layers that are linear in their weight, with the cost model that picks the method.

A layer whose output at position ``s`` of sample ``i`` is ``Y_{is} = W a_{is}`` (a ``Linear``, a
``Conv`` after im2col, an ``Embedding`` with one-hot ``a``) has per-sample, per-row weight rows

.. math::  g_{ik} = Σ_s D_{k,is} a_{isᵀ}  \quad (D_{k,is} ∈ R^o, a_{is} ∈ R^d),

so its Gramian contribution is

.. math::  G[i,k,j,l] = Σ_{s,r} K[i,s,j,r] \, ⟨D_{k,is}, D_{l,jr}⟩,
           \qquad K[i,s,j,r] = ⟨a_{is}, a_{jr}⟩.

Two ways to compute it, with ``b`` samples, ``S`` positions per sample, ``T`` rows per sample:

* **explicit**: form the ``b·T`` rows ``g_{ik}`` (``b T S o d`` flops, ``b T o d`` memory) and
  their Gram matrix (``(bT)² o d``);
* **contraction**: never form ``g``. With ``S = 1`` it is ``G = K ⊙ (D Dᵀ)`` (``b² d + (bT)² o``
  flops), the per-sample trick: no per-sample gradient exists at any point. With ``S > 1``,
  ``M = K D`` then ``G = ⟨D, M⟩`` (``(bS)² d + b² S² T o + b² T² S o`` flops); where
  ``T S ≤ o`` (per-sample losses, ``T = 1``, on every layer wider than its sequence), the same
  flops as ``P = ⟨D_{k,is}, D_{l,jr}⟩`` (one matrix product), ``K ⊙ P`` and the sum over the
  positions ``s, r``: three operations instead of two 5-index contractions, 3–12× faster and
  3–25× more accurate in float32 (measured), with ``P`` no larger than ``M``.

:func:`linear_gramian` takes the cheaper one by these flop counts, or, inside
:func:`fewest_entries` (the engine's low-memory step), the one that forms fewer entries.

A bias added at every position is a weight on a constant input ``1``: appending that input to
``a`` adds ``1`` to every entry of ``K``, so the weight and bias together cost one kernel
(``K + 1``) and one contraction, not two.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from ...linalg.gramian import gramian_of_blocks


def contraction_cost(b: int, s: int, t: int, d: int, o: int) -> int:
    if s == 1:
        return b * b * d + (b * t) ** 2 * o
    return (b * s) ** 2 * d + b * b * s * s * t * o + b * b * t * t * s * o


def explicit_cost(b: int, s: int, t: int, d: int, o: int) -> int:
    return b * t * s * o * d + (b * t) ** 2 * o * d


def contraction_memory(b: int, s: int, t: int, o: int) -> int:
    """Entries the contraction forms: the kernel, then ``P`` (``T S ≤ o``) or ``M``."""
    if s == 1:
        return b * b + (b * t) ** 2
    if b == 1:
        return s * s + t * s * o
    return (b * s) ** 2 + ((b * s * t) ** 2 if t * s <= o else b * b * s * t * o)


def explicit_memory(b: int, t: int, d: int, o: int) -> int:
    """Entries the explicit method forms: the ``b T`` rows of ``o d``."""
    return b * t * o * d


#: whether :func:`linear_gramian` takes the method that forms fewer entries, not the one of
#: fewer flops (set by the engine's low-memory step around its rules, see :func:`fewest_entries`)
_FEWEST_ENTRIES: ContextVar[bool] = ContextVar("fewest_entries", default=False)


@contextmanager
def fewest_entries() -> Iterator[None]:
    """Inside the block, :func:`linear_gramian` picks by memory: the low-memory step computes
    each layer's term during the backward pass, while the activations are alive, where the
    explicit rows (``b T o d`` entries, ``b`` times a weight gradient) may set the step's peak."""
    token = _FEWEST_ENTRIES.set(True)
    try:
        yield
    finally:
        _FEWEST_ENTRIES.reset(token)


def fewest_entries_wanted() -> bool:
    """Whether the rules choose their methods by the entries they form (inside
    :func:`fewest_entries`) rather than by flops."""
    return _FEWEST_ENTRIES.get()


def takes_contraction(b: int, s: int, t: int, d: int, o: int) -> bool:
    """Whether :func:`linear_gramian` contracts (else it forms the explicit rows): by flops, or
    inside :func:`fewest_entries` by the entries each method forms."""
    if _FEWEST_ENTRIES.get():
        return contraction_memory(b, s, t, o) <= explicit_memory(b, t, d, o)
    return contraction_cost(b, s, t, d, o) <= explicit_cost(b, s, t, d, o)


def gramian_from_kernel(kernel: Tensor, grads: Tensor) -> Tensor:
    """``G[i,k,j,l] = Σ_{s,r} K[i,s,j,r] ⟨D[k,i,s], D[l,j,r]⟩`` as ``[b, T, b, T]``.

    Args:
        kernel: ``K`` as ``[b, S, b, S]``.
        grads: ``D`` as ``[T, b, S, o]``.
    """
    t, b, s, o = grads.shape
    if s == 1:
        if t == 1:  # per-sample losses: G = K ⊙ (D Dᵀ)
            rows = grads.reshape(b, o)
            return torch.mm(rows, rows.T).mul_(kernel.reshape(b, b)).reshape(b, 1, b, 1)
        rows = grads[:, :, 0].transpose(0, 1).reshape(b * t, o)
        products = (rows @ rows.T).reshape(b, t, b, t)
        return products * kernel[:, 0, :, 0][:, None, :, None]
    if b == 1:  # one loss row per task: M_k = K D_k for every k in one batched product
        flat = grads.reshape(t, s, o)
        mixed = torch.bmm(kernel.reshape(s, s).expand(t, s, s), flat)
        return torch.mm(flat.reshape(t, -1), mixed.reshape(t, -1).T).reshape(1, t, 1, t)
    if t * s <= o:  # P = ⟨D, D⟩ over (i, s, k) × (j, r, l), no larger than the mixed product
        flat = grads.permute(1, 2, 0, 3).reshape(b * s * t, o)
        products = torch.mm(flat, flat.T).reshape(b, s, t, b, s, t)
        weighted = products.mul_(kernel[:, :, None, :, :, None])
        return weighted.sum((1, 4))
    mixed = torch.einsum("isjr,ljro->isljo", kernel, grads)
    return torch.einsum("kiso,isljo->ikjl", grads, mixed)


def linear_kernel(inputs: Tensor) -> Tensor:
    """``K[i,s,j,r] = ⟨a_{is}, a_{jr}⟩`` for ``inputs`` of shape ``[b, S, d]``."""
    b, s, d = inputs.shape
    flat = inputs.reshape(b * s, d)
    return (flat @ flat.T).reshape(b, s, b, s)


def linear_rows(inputs: Tensor, grads: Tensor) -> Tensor:
    """``g[i,k] = Σ_s D[k,i,s] a_{is}ᵀ`` as ``[b, T, o, d]`` (``inputs`` ``[b,S,d]``, ``grads``
    ``[T,b,S,o]``): one batched product over the samples (``torch.einsum``'s planning cost
    about 25 µs more per call at transformer-layer sizes)."""
    t, b, s, o = grads.shape
    if t == 1:
        return torch.bmm(grads[0].transpose(1, 2), inputs).unsqueeze(1)
    flat = grads.permute(1, 0, 3, 2).reshape(b, t * o, s)
    return torch.bmm(flat, inputs).reshape(b, t, o, inputs.shape[-1])


def linear_gramian(inputs: Tensor, grads: Tensor, with_bias: bool = False) -> Tensor:
    """The weight's (and with ``with_bias``, also the bias's) Gramian contribution
    ``[b, T, b, T]``, by the cheaper method (:func:`takes_contraction`)."""
    t, b, s, o = grads.shape
    d = inputs.shape[-1]
    if takes_contraction(b, s, t, d + with_bias, o):
        if s == 1 and t == 1:
            return per_sample_gramian(inputs.reshape(b, d), grads.reshape(b, o), with_bias)
        kernel = linear_kernel(inputs)
        return gramian_from_kernel(kernel.add_(1.0) if with_bias else kernel, grads)
    gramian = rows_gramian(linear_rows(inputs, grads))  # (summed by column blocks: gram_matrix)
    return gramian + rows_gramian(bias_rows(grads)) if with_bias else gramian


def per_sample_gramian(inputs: Tensor, grads: Tensor, with_bias: bool) -> Tensor:
    """``(A Aᵀ + [1]) ⊙ (D Dᵀ)`` as ``[b, 1, b, 1]`` for one position and one loss per sample, in
    three products (the bias term as ``P + K ⊙ P`` with ``P = D Dᵀ``)."""
    b = inputs.shape[0]
    products = torch.mm(grads, grads.T)
    kernel = torch.mm(inputs, inputs.T)
    gramian = torch.addcmul(products, kernel, products) if with_bias else kernel.mul_(products)
    return gramian.reshape(b, 1, b, 1)


def bias_rows(grads: Tensor) -> Tensor:
    """Rows of a bias added at every position: ``Σ_s D[k,i,s]`` as ``[b, T, o]``."""
    return grads.sum(2).transpose(0, 1)


def rows_gramian(rows: Tensor) -> Tensor:
    """``[b, T, ...]`` rows → their Gram matrix ``[b, T, b, T]``."""
    b, t = rows.shape[:2]
    return gramian_of_blocks([rows], rows=b * t).reshape(b, t, b, t)


def weight_and_bias_gramian(
    inputs: Tensor, grads: Tensor, params: list[Tensor], weight: Tensor
) -> Tensor:
    """Gramian of a Linear-like layer over ``params`` (its weight, its bias, or both): the
    weight contributes the kernel contraction of ``(inputs, grads)``, the bias its summed rows
    (folded into the same contraction when both are there)."""
    has_weight = any(p is weight for p in params)
    if not has_weight:
        return rows_gramian(bias_rows(grads))
    return linear_gramian(inputs, grads, with_bias=len(params) > 1)
