r"""Calls on entries gathered from the samples', laid out sample-major for their rules.

A mixture-of-experts' expert is called on the tokens routed to it (``h[index]`` of the batch's
``[b·s, d]`` tokens, ``h[mask]``); an adapter on the samples of one language (``h[lang ==
k]``). Each entry of such a call's sample dimension belongs to one sample (read from the
graph: :attr:`._sample_trace.Held.rows`), in any order and any number per sample, where the
layer rules read the samples sample-major, sample ``i`` owning ``k`` consecutive entries
(:attr:`~.rules.Call.group`).

So the call is handed to its rule re-laid along that dimension: with ``c_i`` entries of sample
``i`` and ``m = maxᵢ cᵢ``, sample ``i``'s entries fill slots ``i·m … i·m + cᵢ − 1`` (in their
order), and every other slot holds a zero entry, in the inputs and in the output gradients.
A slot whose output gradient is zero adds nothing to any row (a vector-Jacobian product with
a zero cotangent is zero, whatever the input), so each sample's rows ``Σ_{r ∈ i} ∂ℓ/∂θ|_r``,
the Gramian and the update are the call's own, exactly; the rule works on ``b·m`` entries
instead of ``n = Σᵢ cᵢ``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

from ._records import CallRecord

#: the containers a call's arguments may nest tensors in
_NESTED = (tuple, list, dict)


def sample_major(
    record: CallRecord, grads: list[Tensor | None], rows: Tensor, b: int, dim: int, lead: int
) -> tuple[CallRecord, list[Tensor | None], int]:
    """The call re-laid sample-major (module docstring): its record (the inputs with ``n``
    entries along ``dim``, and the outputs' shapes), its output gradients (``dim`` after
    ``lead`` row dimensions) and ``m``, the entries each sample now owns.

    Args:
        record: the call as recorded.
        grads: per tapped output, its output gradient or ``None``.
        rows: ``[n]``, the sample of each entry along ``dim``.
        b: the number of samples.
        dim: the dimension of the gathered entries.
        lead: the row dimensions before the output's own in ``grads`` (0 or 1).
    """
    n = rows.shape[0]
    counts = torch.bincount(rows, minlength=b)
    m = max(int(counts.max()), 1) if n else 1
    order = torch.argsort(rows, stable=True)
    owners = rows[order]
    starts = torch.cumsum(counts, 0) - counts
    slots = owners * m + torch.arange(n, device=rows.device) - starts[owners]
    source = torch.full((b * m,), n, dtype=torch.long, device=rows.device)  # n: the zero entry
    source[slots] = order

    def laid(t: Tensor, d: int) -> Tensor:
        zero = t.new_zeros((*t.shape[:d], 1, *t.shape[d + 1 :]))
        return torch.cat([t, zero], d).index_select(d, source.to(t.device))

    def inputs(value: Any) -> Any:
        gathered = isinstance(value, Tensor) and value.dim() > dim and value.shape[dim] == n
        return laid(value, dim) if gathered else value

    def tree(value: Any) -> Any:  # (a flat tuple or dict without tree_map's walk: most calls)
        if isinstance(value, tuple) and not any(isinstance(v, _NESTED) for v in value):
            return tuple(inputs(v) for v in value)
        if isinstance(value, dict) and not any(isinstance(v, _NESTED) for v in value.values()):
            return {k: inputs(v) for k, v in value.items()}
        return tree_map(inputs, value)

    tapped = [
        t._replace(shape=torch.Size((*t.shape[:dim], b * m, *t.shape[dim + 1 :])))
        for t in record.tapped
    ]
    laid_record = dataclasses.replace(
        record,
        args=tree(record.args),
        kwargs=tree(record.kwargs),
        tapped=tapped,
    )
    laid_grads = [None if g is None else laid(g, dim + lead) for g in grads]
    return laid_record, laid_grads, m
