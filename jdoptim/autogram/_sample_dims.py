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
there, inside a batch-first model (``batch_dim=0``). :func:`moved_sample_dim` reads where such a
call holds the samples from its input's graph, when that input is a transpose or permutation: of
a hooked call's output, the dimension it moved that output's sample dimension to; of another
tensor, the dimension it moved ``batch_dim`` to, when that tensor has size ``b`` there and
nowhere else (at ``s = b`` nothing tells, and the outputs are read along ``batch_dim``). Failing
that, when the outputs do not hold the samples along ``batch_dim`` at all and the input is an
activation (computed in the graph, not indices), from their sizes: the one other dimension of
size ``b`` in the input and every output (Longformer's global query projection of ``[1, b, d]``).
Each reading is proved on the first step of each structure by the engine's check
(:mod:`._certify`), which takes the exact route where it fails.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ._records import CallRecord


def output_sample_dims(record: CallRecord, batch_dim: int) -> list[int]:
    module = record.module
    if isinstance(module, nn.RNNBase):
        return [batch_dim if t.leaf_index == 0 else 1 for t in record.tapped]
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return [batch_dim if t.leaf_index == 0 else 0 for t in record.tapped]
    return [batch_dim] * len(record.tapped)


_MOVES = frozenset({"TransposeBackward0", "TransposeBackward1", "PermuteBackward0"})


def _saved_dim(value: int, rank: int) -> int:
    """A dimension saved by an autograd node, in ``[0, rank)``: a negative one comes back
    wrapped around as an unsigned 64-bit integer (``transpose(-2, -1)`` saves 2⁶⁴ − 2)."""
    return (value - (1 << 64) if value >= 1 << 63 else value) % rank


def _moved_by(node: Any, dim: int, rank: int) -> int:
    """Where the transpose or permutation ``node`` put dimension ``dim`` of its input."""
    if type(node).__name__ == "PermuteBackward0":
        order = [_saved_dim(d, rank) for d in node._saved_dims]
        return order.index(dim)
    first, second = _saved_dim(node._saved_dim0, rank), _saved_dim(node._saved_dim1, rank)
    return second if dim == first else first if dim == second else dim


def _sized_source(node: Any, shape: Sequence[int], batch_dim: int, count: int) -> int | None:
    """``batch_dim`` when the tensor that ``node`` transposed or permuted into ``shape`` has
    size ``count`` there and nowhere else (then it is read as holding the samples there)."""
    rank = len(shape)
    moved = [_moved_by(node, d, rank) for d in range(rank)]  # source dim d → moved[d]
    sizes = [shape[m] for m in moved]
    return batch_dim if [d for d, n in enumerate(sizes) if n == count] == [batch_dim] else None


def moved_sample_dim(
    record: CallRecord,
    batch_dim: int,
    count: int,
    at_batch_dim: bool,
    source_dim: Callable[[Any], int | None],
) -> int | None:
    """The dimension ``d ≠ batch_dim`` along which the call's input and every output hold the
    ``count`` samples, for a call made on a tensor whose samples were moved (see the module
    docs), or ``None``.

    Args:
        record: the call.
        batch_dim: the engine's sample dimension.
        count: the number of samples.
        at_batch_dim: whether its outputs can be read along ``batch_dim`` (then only the input's
            graph can say they are not).
        source_dim: the sample dimension of a hooked call's output, by its autograd node
            (``None`` for a node that is not one), to follow a transpose from it.
    """
    if isinstance(record.module, (nn.RNNBase, nn.MultiheadAttention)):
        return None
    inputs = record.input_tensors()
    if not inputs:
        return None
    x = inputs[0]

    def holds(d: int) -> bool:
        sizes = [x.shape, *(t.shape for t in record.tapped)]
        return all(len(s) > d and s[d] == count for s in sizes)

    node = x.grad_fn
    if node is not None and type(node).__name__ in _MOVES and node.next_functions:
        source = source_dim(node.next_functions[0][0])
        if source is None:  # not a hooked call's output: its sizes, where they are unambiguous
            source = _sized_source(node, x.shape, batch_dim, count)
        if source is not None:
            moved = _moved_by(node, source, x.dim())
            return moved if moved != batch_dim and holds(moved) else None
    if at_batch_dim or node is None or not x.is_floating_point():
        return None  # (indices, as a position embedding takes, are no moved activations)
    candidates = [d for d in range(x.dim()) if d != batch_dim and holds(d)]
    return candidates[0] if len(candidates) == 1 else None


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
