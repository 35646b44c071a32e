"""Where a tensor holds the samples, read from its autograd graph.

:func:`traced_sample_dim` follows a tensor back to a hooked call's output, whose sample
dimension is known (see :mod:`._sample_dims`), and carries that dimension forward through the
nodes between: a transpose moves it, an element-wise operation keeps it, a reshape regroups it
(a sequence-first attention's ``[s, b, d]`` projection viewed as ``[s, b·h, e]``, its heads'
``bmm`` over ``[b·h, s, e]``, and its output viewed back as ``[s, b, d]``: fairseq's and FSMT's
layout), a batched product keeps its leading dimensions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor

MOVES = frozenset({"TransposeBackward0", "TransposeBackward1", "PermuteBackward0"})


def saved_int(value: int) -> int:
    """An integer saved by an autograd node: a negative one comes back wrapped around as an
    unsigned 64-bit integer (``transpose(-2, -1)`` saves 2⁶⁴ − 2)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def saved_dim(value: int, rank: int) -> int:
    """A dimension saved by an autograd node, in ``[0, rank)`` (:func:`saved_int`)."""
    return saved_int(value) % rank


def moved_by(node: Any, dim: int, rank: int) -> int:
    """Where the transpose or permutation ``node`` put dimension ``dim`` of its input."""
    if type(node).__name__ == "PermuteBackward0":
        order = [saved_dim(d, rank) for d in node._saved_dims]
        return order.index(dim)
    first, second = saved_dim(node._saved_dim0, rank), saved_dim(node._saved_dim1, rank)
    return second if dim == first else first if dim == second else dim


#: autograd nodes whose output keeps each operand's dimensions in place (element-wise: an operand
#: of the output's rank is aligned with it dimension by dimension)
_ELEMENTWISE = frozenset(
    {
        *(f"{op}Backward{k}" for op in ("Add", "Sub", "Mul", "Div", "Rsub") for k in (0, 1)),
        *(
            f"{op}Backward0"
            for op in (
                "Neg", "Gelu", "Relu", "Tanh", "Sigmoid", "Silu", "Elu", "LeakyRelu", "Hardtanh",
                "Softplus", "Mish", "Clone", "ToCopy", "NativeDropout", "MaskedFill", "Where",
                "Softmax", "SafeSoftmax", "LogSoftmax", "NativeLayerNorm", "Pow", "Exp", "Abs",
                "Clamp",
            )
        ),
    }
)  # fmt: skip
#: autograd nodes that take a part of their operand along one dimension, keeping the others
#: (``chunk``, ``split``, ``x[:, a:e]``): along any other, the samples stay where they were
_PARTS = frozenset({"SplitBackward0", "SplitWithSizesBackward0", "SliceBackward0"})
#: autograd nodes that join or tile their operands along one dimension (``cat``, ``repeat``):
#: along any other, the samples stay where they were
_JOINS = frozenset({"CatBackward0", "RepeatBackward0"})
#: autograd nodes of reshapes
_RESHAPES = frozenset(
    {
        "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "UnsqueezeBackward0",
        "SqueezeBackward0", "SqueezeBackward1", "SqueezeBackward2",
    }
)  # fmt: skip
#: autograd nodes of gathers of entries (:func:`gathered`)
_GATHERS = frozenset({"IndexBackward0", "IndexSelectBackward0"})
#: autograd nodes of scatters of entries into a tensor without a graph (:func:`_put`)
_PUTS = frozenset({"IndexPutBackward0"})
#: autograd nodes of expansions (an operand aligned on the right, as element-wise ones)
_EXPANDS = frozenset({"ExpandBackward0"})
#: autograd nodes of batched products and how many leading dimensions each operand shares with
#: the output (the batch of ``bmm``; the batch and heads of attention)
_BATCHED_PRODUCTS = {
    "BmmBackward0": 1,
    "ScaledDotProductFlashAttentionForCpuBackward0": 2,
    "ScaledDotProductEfficientAttentionBackward0": 2,
    "ScaledDotProductFlashAttentionBackward0": 2,
    "ScaledDotProductCudnnAttentionBackward0": 2,
}
#: every node a trace passes
_PASSED = (
    MOVES
    | _ELEMENTWISE
    | _PARTS
    | _JOINS
    | _RESHAPES
    | _EXPANDS
    | _GATHERS
    | _PUTS
    | frozenset(_BATCHED_PRODUCTS)
)
#: how many nodes back a trace looks
_TRACE_DEPTH = 32


class Held(NamedTuple):
    """Where a tensor holds the samples.

    Attributes:
        dim: its sample dimension.
        group: how many consecutive entries of ``dim`` each sample owns (sample-major).
        rows: where the entries of ``dim`` were gathered from the samples' (``h[index]``,
            ``h[mask]``, ``index_select``: a mixture-of-experts' tokens routed to one expert, a
            subset of the samples): the sample of each entry, in any order (``group`` is then
            1).
        by_values: whether the reading rests on the values of index tensors, not on shapes
            alone (a scatter whose index is each entry's sample, :func:`_put`): the next
            forward of the same shapes may not satisfy it, so it is read anew at every step
            (:attr:`~._step.StepTemplate.reusable`).
    """

    dim: int
    group: int = 1
    rows: Tensor | None = None
    by_values: bool = False


#: a hooked call's output, by its autograd node and output number: where it holds the samples,
#: and its shape (``None`` for a node that is not one)
SourceDim = Callable[[Any, int], "tuple[Held, tuple[int, ...]] | None"]
Shape = tuple[int, ...]


def traced_sample_dim(x: Tensor, source_dim: SourceDim) -> Held | None:
    """Where ``x`` holds the samples, read from its graph: followed back to a hooked call's
    output through transposes and permutations (which move the dimension), element-wise
    operations (which keep it, on an operand not broadcast along it), reshapes (which keep it
    where the sizes before it agree, each sample's entries regrouped: ``[s, b·h, e] → [s, b,
    h·e]``), batched products (``bmm``, attention: their leading dimensions) and gathers along
    it (which give each gathered entry its sample: :attr:`Held.rows`); ``None`` where the trace
    finds none within a few nodes. Each tensor's shape is the one its node's gradient takes
    (``_input_metadata``); the only saved tensors read are a gather's indices, and not where
    hooks packed them (a checkpointed segment, whose unpacking would re-run its forward)."""
    if x.grad_fn is None:
        return None
    seen: set[tuple[int, int]] = set()

    def trace(node: Any, nr: int, depth: int) -> Held | None:
        known = source_dim(node, nr)
        if known is not None:
            return known[0] if known[1] == _shape(node, nr) else None
        name = type(node).__name__
        if depth == 0 or (id(node), nr) in seen or name not in _PASSED:
            return None
        seen.add((id(node), nr))
        shape = _shape(node, nr)
        for child, child_nr in node.next_functions:
            inner = None if child is None else trace(child, child_nr, depth - 1)
            if inner is not None:
                held = _carried(name, node, inner, _shape(child, child_nr), shape)
                if held is not None:
                    return held
        return None

    return trace(x.grad_fn, x.output_nr, _TRACE_DEPTH)


def _shape(node: Any, nr: int) -> Shape:
    """The shape of ``node``'s output ``nr`` (of the gradient it takes)."""
    return tuple(node._input_metadata[nr].shape)


def _carried(name: str, node: Any, held: Held, source: Shape, shape: Shape) -> Held | None:
    """Where ``node`` (of type ``name``, output of shape ``shape``) holds the samples that its
    operand of shape ``source`` holds as ``held``; ``None`` where they do not stay whole in one
    dimension."""
    if name in MOVES:
        return held._replace(dim=moved_by(node, held.dim, len(shape)))
    if name in _RESHAPES:
        return _reshaped(held, source, shape)
    if name in _GATHERS:
        return _gathered(node, held, source, shape)
    if name in _PUTS:
        return _put(node, held, source, shape)
    if name in _BATCHED_PRODUCTS:
        lead = _BATCHED_PRODUCTS[name]
        return held if held.dim < lead and source[:lead] == shape[:lead] else None
    offset = len(shape) - len(source)  # the others: aligned on the right
    dim = held.dim + offset
    if offset < 0 or source[held.dim] != shape[dim]:
        return None  # (broadcast, joined or tiled along the samples' dimension)
    if name == "RepeatBackward0" and node._saved_repeats[dim] != 1:
        return None  # (tiled along it by a factor of 1 only where its size is 1 too)
    return held._replace(dim=dim)


def _reshaped(held: Held, source: Shape, shape: Shape) -> Held | None:
    """Where a reshape of ``source`` into ``shape`` holds the samples that ``source`` holds as
    ``held``: the output dimension ``d`` whose preceding sizes multiply to those before the
    sample dimension, and whose size is a multiple of the number of samples. Each sample owns a
    contiguous run of the flat entries after the preceding dimensions, so it owns
    ``shape[d] / samples`` consecutive entries of ``d`` (``[s, b·h, e] → [s, b, h·e]``: one).
    Gathered entries (:attr:`Held.rows`) stay only in a dimension of their own size."""
    dim, group, rows = held.dim, held.group, held.rows
    count, outer = source[dim] // group, math.prod(source[:dim])
    prefix = 1
    for d, size in enumerate(shape):
        if prefix == outer and rows is not None and size == source[dim]:
            return held._replace(dim=d, group=1)
        if prefix == outer and rows is None and size % count == 0 and (size > 1 or count == 1):
            return held._replace(dim=d, group=size // count)
        prefix *= size
        if prefix > outer:
            return None
    return None


def _gathered(node: Any, held: Held, source: Shape, shape: Shape) -> Held | None:
    """Where a gather (``node``: indexing or ``index_select``) of ``source`` holds the samples
    that ``source`` holds as ``held``. Along another dimension, where they were; along theirs,
    in the gathered dimension, each entry owning the sample of the entry it was taken from.
    ``None`` for indices packed by hooks, or advanced indexing the trace does not follow."""
    if type(node).__name__ == "IndexSelectBackward0":
        if node._raw_saved_index.unpack_hook is not None:
            return None
        along = saved_dim(node._saved_dim, len(source))
        return held if along != held.dim else _taken(held, source, node._saved_index, along)
    indexed = _index_tensors(node)
    if indexed is None:
        return None
    first, indices = indexed
    index = indices[0]
    covered = index.dim() if index.dtype == torch.bool else len(indices)
    if first <= held.dim < first + len(indices):  # (several indices: the sample dim's own)
        index = indices[held.dim - first]
    if held.dim < first:
        return held if source[: held.dim + 1] == shape[: held.dim + 1] else None
    if held.dim >= first + covered:  # after the indexed dimensions: moved by their count
        return held._replace(dim=held.dim - covered + 1)
    if index.dtype == torch.bool:  # the entries of the mask's true places, row-major
        index = index.nonzero()[:, held.dim - first]
    return _taken(held, source, index, first)


def _index_tensors(node: Any) -> tuple[int, list[Tensor]] | None:
    """The first indexed dimension of an indexing node (a gather ``x[i, j]`` or a scatter
    ``x[i, j] = v``) and its index tensors: one (a mask, or a 1-D index), or several 1-D integer
    ones of one length on adjacent dimensions (Longformer's ``h[seq_idx, batch_idx]``), whose
    entries then make one dimension in their place. ``None`` for indices packed by hooks, or
    advanced indexing the trace does not follow (indices broadcast together, or apart: their
    entries' dimension moved first)."""
    raws = node._raw_saved_indices
    if any(r is not None and r.unpack_hook is not None for r in raws):
        return None
    found = [(d, t) for d, t in enumerate(node._saved_indices) if t is not None]
    if not found:
        return None
    first, index = found[0]
    if len(found) == 1:
        return None if index.dtype != torch.bool and index.dim() != 1 else (first, [index])
    dims, tensors = [d for d, _ in found], [t for _, t in found]
    adjacent = dims == list(range(first, first + len(found)))
    flat = all(t.dim() == 1 and t.dtype != torch.bool and t.shape == index.shape for t in tensors)
    return (first, tensors) if adjacent and flat else None


def _put(node: Any, held: Held, source: Shape, shape: Shape) -> Held | None:
    """Where a scatter ``out[i₁, …, i_k] = v`` into a tensor without a graph (``new_zeros``)
    holds the samples that its values ``v`` (of shape ``source``) hold as ``held``: when they
    are entries gathered from the samples' (:attr:`Held.rows`) in the dimension the indices
    address, and one index tensor ``i_d`` is each entry's sample, dimension ``d`` of the output
    indexes the samples (every other place of it is a constant). Longformer's global attention
    scatters its global tokens ``h[seq_idx, batch_idx]`` into ``[g, b, d]`` at ``[local_idx,
    batch_idx]``. ``None`` otherwise."""
    if node.next_functions[0][0] is not None or held.rows is None:
        return None
    indexed = _index_tensors(node)
    if indexed is None:
        return None
    first, indices = indexed
    if indices[0].dtype == torch.bool or held.dim != first:
        return None
    expected = (*shape[:first], indices[0].shape[0], *shape[first + len(indices) :])
    if tuple(source) != expected:
        return None
    rows = held.rows
    for d, index in enumerate(indices, start=first):
        if index.shape == rows.shape and torch.equal(index.to(rows.device), rows):
            return Held(d, by_values=True)
    return None


def _taken(held: Held, source: Shape, index: Tensor, dim: int) -> Held:
    """The samples of the entries ``index`` takes along their dimension, now ``dim``."""
    owner = held.rows
    if owner is None:
        entries = torch.arange(source[held.dim], device=index.device)
        owner = entries // held.group
    taken = owner[index.reshape(-1).to(owner.device)]  # (a 0-d index selects 1)
    return Held(dim, 1, taken, held.by_values)
