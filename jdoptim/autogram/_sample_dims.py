"""Where each tensor of a call indexes the samples, in per-sample mode.

By default every module tensor indexes the samples along ``batch_dim`` (an input is taken as
batched when its size there is the number of samples). Recurrent layers are the exception the
engine knows: with ``batch_first=True`` (required with ``batch_dim=0``), their sequence input and
output index samples along 0, but their hidden states (``h₀``/``hₙ``, ``c₀``/``cₙ``, shape
``[layers, batch, hidden]``) along 1. And ``MultiheadAttention``'s attention weights (its second
output, with the default ``need_weights=True``) are ``[batch, L, S]`` (or ``[batch, heads, L,
S]``) whatever its ``batch_first``: a sequence-first model's attention (``batch_dim=1``, ``[L,
batch, E]`` activations) holds the samples along 0 there.

A layer may also be called on a tensor whose samples were moved to another dimension: Longformer's
and LED's self-attention transpose their ``[b, s, d]`` input to ``[s, b, d]`` and project it
there, inside a batch-first model (``batch_dim=0``); so does code feeding ``h.transpose(0, 1)`` to
``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` or ``nn.GRU`` with their default
``batch_first=False``. A recurrent layer or ``MultiheadAttention`` holds the samples where its
``batch_first`` says (:func:`declared_sample_dim`). For any other call,
:func:`moved_sample_dim` reads it from the input's graph
(:func:`._sample_trace.traced_sample_dim`): followed back to a hooked call's output, whose
sample dimension is known, through transposes (which move it), element-wise operations,
reshapes (fairseq's ``[s, b, d] → [s, b·h, e]``), batched products, and gathers (a mixture of
experts' ``h[index]``: then each gathered entry has its sample, :mod:`._gathered`), and
scatters of gathered entries into zeros at their samples' places (Longformer's global query
projection of ``[g, b, d]``, whose input is ``new_zeros`` with ``[local_idx, batch_idx]`` set
from ``h[seq_idx, batch_idx]``). Failing that, when the input is a transpose of a tensor with
size ``b`` along ``batch_dim`` and nowhere else, where the transpose moved ``batch_dim``; and
when the outputs do not hold the samples along ``batch_dim`` at all and the input is
floating-point (not indices), from the sizes: the one other dimension of size ``b`` in the
input and every output. Where nothing tells (a model's raw input
transposed at ``s = b``), the outputs are read along ``batch_dim``. Each reading is proved on the
first step of each structure by the engine's check (:mod:`._certify`), which takes the exact
route where it fails.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ._records import CallRecord
from ._sample_trace import MOVES, Held, SourceDim, moved_by, traced_sample_dim


def output_sample_dims(record: CallRecord, batch_dim: int) -> list[int]:
    module = record.module
    if isinstance(module, nn.RNNBase):
        return [batch_dim if t.leaf_index == 0 else 1 for t in record.tapped]
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return [batch_dim if t.leaf_index == 0 else 0 for t in record.tapped]
    return [batch_dim] * len(record.tapped)


def _sized_source(node: Any, shape: Sequence[int], batch_dim: int, count: int) -> int | None:
    """``batch_dim`` when the tensor that ``node`` transposed or permuted into ``shape`` has
    size ``count`` there and nowhere else (then it is read as holding the samples there)."""
    rank = len(shape)
    moved = [moved_by(node, d, rank) for d in range(rank)]  # source dim d → moved[d]
    sizes = [shape[m] for m in moved]
    return batch_dim if [d for d, n in enumerate(sizes) if n == count] == [batch_dim] else None


def declared_sample_dim(module: nn.Module) -> int | None:
    """The sample dimension a recurrent layer or ``MultiheadAttention`` declares by its
    ``batch_first`` (``None`` for any other module)."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return 0 if module.batch_first else 1
    return None


def moved_sample_dim(
    record: CallRecord,
    batch_dim: int,
    count: int,
    at_batch_dim: bool,
    source_dim: SourceDim,
) -> Held | None:
    """The dimension ``d ≠ batch_dim`` along which the call's input and every output hold the
    ``count`` samples, for a call made on a tensor whose samples were moved (see the module
    docs), or the dimension along which they hold entries gathered from the samples' (each
    entry's sample in :attr:`~._sample_trace.Held.rows`: a mixture-of-experts' expert called
    on the tokens routed to it); ``None`` where neither is read.

    Args:
        record: the call.
        batch_dim: the engine's sample dimension.
        count: the number of samples.
        at_batch_dim: whether its outputs can be read along ``batch_dim`` (then only the input's
            graph can say they are not).
        source_dim: where hooked calls' outputs hold the samples (see :data:`SourceDim`).
    """
    if declared_sample_dim(record.module) is not None:
        return None
    inputs = record.input_tensors()
    if not inputs:
        return None
    x = inputs[0]

    def holds(d: int) -> bool:
        sizes = [x.shape, *(t.shape for t in record.tapped)]
        return all(len(s) > d and s[d] == count for s in sizes)

    traced = traced_sample_dim(x, source_dim)
    node = x.grad_fn
    if traced is None and node is not None and type(node).__name__ in MOVES:
        source = _sized_source(node, x.shape, batch_dim, count)  # where unambiguous
        traced = None if source is None else Held(moved_by(node, source, x.dim()))
    if traced is not None and traced.rows is not None:
        return traced if _takes_gathered(record, x, traced) else None
    if traced is not None:
        dim, group = traced.dim, traced.group
        return traced if dim != batch_dim and group == 1 and holds(dim) else None
    if at_batch_dim or not x.is_floating_point():
        return None  # (indices, as a position embedding takes, are no moved activations)
    candidates = [d for d in range(x.dim()) if d != batch_dim and holds(d)]
    return Held(candidates[0]) if len(candidates) == 1 else None


def _takes_gathered(record: CallRecord, x: Tensor, held: Held) -> bool:
    """Whether a call on gathered entries (:attr:`Held.rows`) is read as theirs: its input and
    every output hold them along the same dimension (and it is no sample-shared call)."""
    assert held.rows is not None
    n = held.rows.shape[0]
    shapes = [x.shape, *(t.shape for t in record.tapped)]
    fits = all(len(s) > held.dim and s[held.dim] == n for s in shapes)
    return fits and record.unexpanded is None and not record.paths


def input_sample_dims(
    module: nn.Module, flat_inputs: Sequence[Any], batch_dim: int, count: int
) -> list[int | None]:
    dims: list[int | None] = []
    first = True
    for t in flat_inputs:
        if not isinstance(t, Tensor):
            dims.append(None)
            continue
        dim = batch_dim if first or not isinstance(module, nn.RNNBase) else 1
        first = False
        dims.append(dim if t.dim() > dim and t.shape[dim] == count else None)
    return dims


def samples_at_batch_dim(losses: Tensor, batch_dim: int | None) -> Tensor:
    """A vector of per-sample losses ``[b]`` seen with its samples along ``batch_dim``
    (``[1, …, 1, b]``), where the model's tensors index the samples along a later dimension (a
    sequence-first model: ``batch_first=False`` attention, ``[s, b, d]`` activations); any other
    losses as they are. A view: the same graph, rows and weights, and the same ``[b, b]``
    Gramian once flattened."""
    if batch_dim is None or losses.dim() != 1 or batch_dim == 0:
        return losses
    return losses.reshape((1,) * batch_dim + tuple(losses.shape))
