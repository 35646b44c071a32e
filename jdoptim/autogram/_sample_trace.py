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
from typing import Any

from torch import Tensor

MOVES = frozenset({"TransposeBackward0", "TransposeBackward1", "PermuteBackward0"})


def _saved_dim(value: int, rank: int) -> int:
    """A dimension saved by an autograd node, in ``[0, rank)``: a negative one comes back
    wrapped around as an unsigned 64-bit integer (``transpose(-2, -1)`` saves 2⁶⁴ − 2)."""
    return (value - (1 << 64) if value >= 1 << 63 else value) % rank


def moved_by(node: Any, dim: int, rank: int) -> int:
    """Where the transpose or permutation ``node`` put dimension ``dim`` of its input."""
    if type(node).__name__ == "PermuteBackward0":
        order = [_saved_dim(d, rank) for d in node._saved_dims]
        return order.index(dim)
    first, second = _saved_dim(node._saved_dim0, rank), _saved_dim(node._saved_dim1, rank)
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
                "Softmax", "LogSoftmax", "NativeLayerNorm", "Pow", "Exp", "Abs", "Clamp",
            )
        ),
    }
)  # fmt: skip
#: autograd nodes of reshapes
_RESHAPES = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})
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
_PASSED = MOVES | _ELEMENTWISE | _RESHAPES | _EXPANDS | frozenset(_BATCHED_PRODUCTS)
#: how many nodes back a trace looks
_TRACE_DEPTH = 24

#: the sample dimension, how many consecutive entries of it each sample owns, and the shape of
#: a hooked call's output, by its autograd node and output number (``None`` for a node that is
#: not one)
SourceDim = Callable[[Any, int], "tuple[int, int, tuple[int, ...]] | None"]
#: where a tensor holds the samples: its dimension and each sample's entries there
Held = tuple[int, int]
Shape = tuple[int, ...]


def traced_sample_dim(x: Tensor, source_dim: SourceDim) -> Held | None:
    """Where ``x`` holds the samples, read from its graph: followed back to a hooked call's
    output through transposes and permutations (which move the dimension), element-wise
    operations (which keep it, on an operand not broadcast along it), reshapes (which keep it
    where the sizes before it agree, each sample's entries regrouped: ``[s, b·h, e] → [s, b,
    h·e]``) and batched products (``bmm``, attention: their leading dimensions); ``None``
    where the trace finds none within a few nodes. Each tensor's shape is the one its node's
    gradient takes (``_input_metadata``): no saved tensor is read (a checkpointed segment
    would recompute it)."""
    if x.grad_fn is None:
        return None
    seen: set[tuple[int, int]] = set()

    def trace(node: Any, nr: int, depth: int) -> Held | None:
        known = source_dim(node, nr)
        if known is not None:
            return known[:2] if known[2] == _shape(node, nr) else None
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
    dim, group = held
    if name in MOVES:
        return moved_by(node, dim, len(shape)), group
    if name in _RESHAPES:
        return _reshaped(held, source, shape)
    if name in _BATCHED_PRODUCTS:
        lead = _BATCHED_PRODUCTS[name]
        return held if dim < lead and source[:lead] == shape[:lead] else None
    offset = len(shape) - len(source)  # element-wise and expand: aligned on the right
    if offset < 0 or source[dim] != shape[dim + offset]:
        return None  # (broadcast along the samples' dimension: not the samples' tensor)
    return dim + offset, group


def _reshaped(held: Held, source: Shape, shape: Shape) -> Held | None:
    """Where a reshape of ``source`` into ``shape`` holds the samples that ``source`` holds as
    ``held``: the output dimension ``d`` whose preceding sizes multiply to those before the
    sample dimension, and whose size is a multiple of the number of samples. Each sample owns a
    contiguous run of the flat entries after the preceding dimensions, so it owns
    ``shape[d] / samples`` consecutive entries of ``d`` (``[s, b·h, e] → [s, b, h·e]``: one)."""
    dim, group = held
    count, outer = source[dim] // group, math.prod(source[:dim])
    prefix = 1
    for d, size in enumerate(shape):
        if prefix == outer and size % count == 0 and (size > 1 or count == 1):
            return d, size // count
        prefix *= size
        if prefix > outer:
            return None
    return None
