r"""A lookup table's Gramian from the pairs of positions that read the same row.

An embedding ``Y_{is} = W[idx_{is}]`` has the Gramian (see :mod:`._contraction`)

.. math::  G[i,k,j,l] = Σ_{s,r} [idx_{is} = idx_{jr}] \, ⟨D_{k,is}, D_{l,jr}⟩ .

The kernel contraction forms every one of the ``(bS)²`` position pairs (``(bS)² e`` flops for
``⟨D, D⟩``, ``(bS)²`` entries), although only the pairs that read the same row count. Here:

1. **merge** each sample's positions that read one row: ``R_{k,i,v} = Σ_{s: idx_{is} = v}
   D_{k,is}``, one entry per distinct ``(i, v)`` (``n' ≤ bS`` of them), so that
   ``G[i,k,j,l] = Σ_v ⟨R_{k,i,v}, R_{l,j,v}⟩``;
2. **pair** the entries of each row ``v``: with ``c_v`` samples reading it, ``P = Σ_v c_v²``
   pairs, each adding ``⟨R_{k,i,v}, R_{l,j,v}⟩`` to ``G[i,k,j,l]`` (an accumulating scatter).

``P ≤ b · n'`` (an entry pairs with at most one entry per sample), so this costs at most
``1/S`` of the kernel's pairs, and on a vocabulary far fewer: ``b = 256`` samples of ``S = 16``
tokens from 512 rows give ``P ≈ 4·10⁴`` against ``(bS)² ≈ 1.7·10⁷``. The pairs are taken in
chunks of at most :data:`_PAIRS_PER_CHUNK`, so memory stays ``O(chunk · e)`` however many there
are. :func:`pairs_are_cheaper` says when this beats the kernel (it costs a sort and a scatter:
on a few hundred positions the kernel's dense products are faster).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

#: pairs gathered and scattered at once (memory ``2 · chunk · e`` entries)
_PAIRS_PER_CHUNK = 1 << 18
#: below this many positions ``b S`` the kernel's dense products win whatever the pairs
_MIN_POSITIONS = 512


class _Entries(NamedTuple):
    """The distinct ``(row, sample)`` entries of an index ``[b, S]``, sorted by row then sample
    (as ``row · b + sample``), each position's entry, and how many entries each row has."""

    keys: Tensor
    inverse: Tensor
    counts: Tensor


def _entries(index: Tensor) -> _Entries:
    b = index.shape[0]
    key = (index.long() * b + _samples(b, index)).reshape(-1)  # (row, sample), row-major
    keys, inverse = torch.unique(key, return_inverse=True)
    # (counted by runs of the sorted keys, not by a bincount whose array would span the table's
    # rows, a million for a catalogue: 4.6 ms for 1,024 positions)
    _, counts = torch.unique_consecutive(keys // b, return_counts=True)
    return _Entries(keys, inverse, counts)


def _cheaper(positions: int, counts: Tensor) -> bool:
    return int((counts * counts).sum()) * 4 < positions * positions


def pairs_are_cheaper(index: Tensor, grads: Tensor) -> bool:
    """Whether :func:`index_pairs_gramian` costs less than the kernel contraction here: at
    least :data:`_MIN_POSITIONS` positions, and its pairs (counted exactly, by runs of the
    sorted entries) fewer than a quarter of the kernel's ``(bS)²`` (each pair costs a gather, a
    dot product and a scatter where the kernel's cost a multiply-add)."""
    n = index.numel()
    return n >= _MIN_POSITIONS and _cheaper(n, _entries(index).counts)


def _pair_count(index: Tensor) -> int:
    """``Σ_v c_v²`` over the distinct ``(sample, row)`` entries (``index`` is ``[b, S]``)."""
    counts = _entries(index).counts
    return int((counts * counts).sum())


def _samples(b: int, index: Tensor) -> Tensor:
    """The sample of each position of ``index`` (``[b, S]``), as ``index``'s shape."""
    return torch.arange(b, device=index.device)[:, None].expand(index.shape)


def pairs_gramian_if_cheaper(index: Tensor, grads: Tensor) -> Tensor | None:
    """:func:`index_pairs_gramian` where :func:`pairs_are_cheaper`, else ``None``: the entries
    found once for both."""
    n = index.numel()
    if n < _MIN_POSITIONS:
        return None
    entries = _entries(index)
    return index_pairs_gramian(index, grads, entries) if _cheaper(n, entries.counts) else None


def index_pairs_gramian(index: Tensor, grads: Tensor, entries: _Entries | None = None) -> Tensor:
    """``G[i,k,j,l] = Σ_{s,r} [idx_{is} = idx_{jr}] ⟨D[k,i,s], D[l,j,r]⟩`` as ``[b, T, b, T]``
    (module docstring).

    Args:
        index: the looked-up rows, ``[b, S]`` (integers).
        grads: ``D`` as ``[T, b, S, e]`` (zero at positions whose row gets no gradient).
        entries: ``index``'s entries (:func:`_entries`), where already found.
    """
    t, b, s, e = grads.shape
    keys, inverse, counts = _entries(index) if entries is None else entries
    values = grads.permute(1, 2, 0, 3).reshape(b * s, t, e)
    merged = values.new_zeros(keys.shape[0], t, e).index_add_(0, inverse, values)
    owner = keys % b
    # entry p of a row read by c samples pairs with the c entries of its row, from its start
    partners = counts.repeat_interleave(counts)  # [n'] c of each entry's row
    starts = (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    out = grads.new_zeros(b * b, t, t)
    ends = torch.cumsum(partners, 0)
    first_entry = 0
    n = keys.shape[0]
    while first_entry < n:  # chunks of whole entries, about _PAIRS_PER_CHUNK pairs each
        done = int(ends[first_entry - 1]) if first_entry else 0
        last = int(torch.searchsorted(ends, done + _PAIRS_PER_CHUNK, right=True))
        last = max(last, first_entry + 1)
        _add_pairs(out, merged, owner, partners, starts, first_entry, min(last, n), b)
        first_entry = last
    return out.reshape(b, b, t, t).permute(0, 2, 1, 3)


def _add_pairs(
    out: Tensor,
    merged: Tensor,
    owner: Tensor,
    partners: Tensor,
    starts: Tensor,
    lo: int,
    hi: int,
    b: int,
) -> None:
    """Adds to ``out`` (``[b·b, T, T]``) the pairs of entries ``lo … hi − 1`` with their rows'
    entries."""
    counts = partners[lo:hi]
    first = torch.arange(lo, hi, device=merged.device).repeat_interleave(counts)
    offsets = torch.arange(first.shape[0], device=merged.device)
    offsets -= (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    second = starts[lo:hi].repeat_interleave(counts) + offsets
    left, right = merged[first], merged[second]
    if merged.shape[1] == 1:
        dots = (left[:, 0] * right[:, 0]).sum(-1)[:, None, None]
    else:
        dots = torch.einsum("pke,ple->pkl", left, right)
    out.index_add_(0, owner[first] * b + owner[second], dots)
