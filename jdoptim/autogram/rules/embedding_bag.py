r"""``nn.EmbeddingBag`` in ``"sum"`` and ``"mean"`` modes (no ``max_norm``, no
``scale_grad_by_freq``): the lookup of recommendation models.

A bag's output is a weighted sum of the rows it looks up,

.. math::  y_β = \sum_{t ∈ β} c_t\, W_{\mathrm{idx}_t}, \qquad c_t = \begin{cases}
           \text{the per-sample weight } ω_t \text{ (or 1)} & \text{"sum"} \\
           1 / |β| & \text{"mean"} \end{cases}

over the bag's entries other than ``padding_idx`` (which count in neither), so the bag's output
gradient ``D_β`` gives entry ``t`` the gradient ``c_t D_{β(t)}`` at row ``idx_t``: the bag is an
embedding lookup of its entries with output gradients ``c_t D_{β(t)}``. This rule lays the
entries of each sample's bags out as the positions of an :class:`~.embedding.EmbeddingRule`
(bags of different sizes, from ``offsets``, padded with entries of zero gradient), which then
gives the Gramian by its index kernel, never a ``[V, e]`` gradient per row, and the rows where a
tied weight needs them. A sample owns its bags: one bag per sample, or ``k`` consecutive ones
(several features per sample, sample-major), as the engine's layout says (``Call.group``). The
update scatters ``c_t (Σ_k w_{·k} D[k])_{β(t)}`` into the looked-up rows, a sparse gradient of
those rows for ``sparse=True`` as ``backward()`` gives it. ``"max"`` mode (its gradient follows
each feature's arg-max) goes through the generic rule.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call, full_precision
from .embedding import EmbeddingRule, scattered_update


def _arguments(call: Call) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
    """``(input, offsets, per_sample_weights)`` of a call ``bag(input, offsets=None,
    per_sample_weights=None)``, or ``None`` for another signature."""
    names = ("input", "offsets", "per_sample_weights")
    args, kwargs = call.record.args, call.record.kwargs
    if len(args) > 3 or any(k not in names for k in kwargs):
        return None
    given: dict[str, Any] = dict(zip(names, args))
    if any(k in given for k in kwargs):
        return None
    given.update(kwargs)
    found = [given.get(name) for name in names]
    if not all(x is None or isinstance(x, Tensor) for x in found) or found[0] is None:
        return None
    return found[0], found[1], found[2]


@register_rule(nn.EmbeddingBag)
class EmbeddingBagRule(EmbeddingRule):
    """The bags' entries as an :class:`~.embedding.EmbeddingRule`'s positions (module docs)."""

    @classmethod
    def applies(cls, call: Call) -> bool:
        module = call.module
        if not isinstance(module, nn.EmbeddingBag) or module.mode not in ("sum", "mean"):
            return False
        if module.max_norm is not None or module.scale_grad_by_freq:
            return False
        found = _arguments(call)
        if found is None or not cls.differentiates_attributes(call, "weight"):
            return False
        if call.batch_dim not in (None, 0):  # (the bags along the output's first dimension)
            return False
        index, offsets, _ = found
        tapped = call.record.tapped
        if len(tapped) != 1 or tapped[0].leaf_index != 0 or len(tapped[0].shape) != 2:
            return False
        if index.dim() == 2:
            return offsets is None
        return index.dim() == 1 and offsets is not None and offsets.dim() == 1

    def __init__(self, call: Call) -> None:  # (EmbeddingRule's attributes, from the bags)
        LayerRule.__init__(self, call)
        module = call.module
        assert isinstance(module, nn.EmbeddingBag)  # (applies checked it, and the arguments)
        self.size = module.num_embeddings
        index, offsets, weights = _arguments(call)  # type: ignore[misc]
        bags = call.record.tapped[0].shape[0]
        self.tokens, self.bag_of = _entries(index, offsets, module.include_last_offset)
        dtype = full_precision(module.weight.detach()[:0]).dtype
        self.coefficients = _coefficients(
            self.tokens, self.bag_of, bags, weights, (module.mode, module.padding_idx), dtype
        )
        self._layout(bags)

    def _layout(self, bags: int) -> None:
        """``index`` ``[b, S]`` and ``grads`` ``[T, b, S, e]``: each sample's entries in order,
        padded to the longest sample's with entries of index 0 and zero gradient."""
        call, device = self.call, self.tokens.device
        b = call.b
        per_sample = bags // b  # (the engine's layout: b samples of `group` bags, or one)
        sample_of = torch.div(self.bag_of, per_sample, rounding_mode="floor")
        counts = torch.bincount(sample_of, minlength=b)
        first = torch.cumsum(counts, 0) - counts
        position = torch.arange(self.tokens.numel(), device=device) - first[sample_of]
        width = max(int(counts.max()), 1) if counts.numel() else 1
        self.index = torch.zeros(b, width, dtype=torch.long, device=device)
        self.index[sample_of, position] = self.tokens
        bag_grads = full_precision(call.grad(0)).reshape(call.T, bags, -1)  # [T, bags, e]
        values = bag_grads[:, self.bag_of] * self.coefficients.to(bag_grads.dtype)[None, :, None]
        grads = bag_grads.new_zeros(call.T, b, width, bag_grads.shape[-1])
        grads[:, sample_of, position] = values
        self.grads = grads

    @property
    def sparse_gradients(self) -> bool:
        return self.module.sparse

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        """``Σ_t c_t (Σ_k w_{·k} D[k])_{β(t)}`` scattered into the looked-up rows (sparse rows
        of the entries other than ``padding_idx`` for ``sparse=True``)."""
        module = self.module
        per_bag = self.call.weighted_grad(0, weights)  # [bags, e]
        values = per_bag[self.bag_of] * self.coefficients.to(per_bag.dtype)[:, None]
        grad = scattered_update(self.tokens, values, self.size, module.padding_idx, module.sparse)
        return [grad for _ in params]


def _entries(index: Tensor, offsets: Tensor | None, include_last: bool) -> tuple[Tensor, Tensor]:
    """The looked-up rows of every entry, in order, and the bag of each: a ``[bags, L]`` input's
    rows are its bags; a flat input's bags start at ``offsets`` (the last one closing the last
    bag with ``include_last_offset``)."""
    if index.dim() == 2:
        bags, length = index.shape
        bag_of = torch.arange(bags, device=index.device).repeat_interleave(length)
        return index.reshape(-1), bag_of
    assert offsets is not None
    starts = offsets[:-1] if include_last else offsets
    entries = torch.arange(index.numel(), device=index.device)
    bag_of = torch.searchsorted(starts.contiguous(), entries, right=True) - 1
    return index, bag_of


def _coefficients(
    tokens: Tensor,
    bag_of: Tensor,
    bags: int,
    weights: Tensor | None,
    options: tuple[str, int | None],
    dtype: torch.dtype,
) -> Tensor:
    """``c_t`` of every entry (module docs), in ``dtype``: the per-sample weight (or 1) in
    ``"sum"`` mode, ``1 / |bag|`` in ``"mean"`` mode; 0 at ``padding_idx``, which counts in no
    bag (``options`` is the mode and ``padding_idx``)."""
    mode, padding = options
    valid = torch.ones_like(tokens, dtype=torch.bool) if padding is None else tokens.ne(padding)
    kept = valid.to(dtype)
    if mode == "mean":
        sizes = torch.bincount(bag_of[valid], minlength=bags).clamp_min(1)
        return kept / sizes[bag_of].to(dtype)
    return kept if weights is None else weights.detach().reshape(-1).to(dtype) * kept
