"""Where a tensor holds the samples, read from its autograd graph.

:func:`traced_sample_dim` follows a tensor back through transposes, permutations and
element-wise operations to a hooked call's output, whose sample dimension is known (see
:mod:`._sample_dims`), each transpose moving it.
"""

from __future__ import annotations

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
#: how many nodes back a trace looks
_TRACE_DEPTH = 12

#: the sample dimension and rank of a hooked call's output, by its autograd node and output
#: number (``None`` for a node that is not one)
SourceDim = Callable[[Any, int], "tuple[int, int] | None"]


def traced_sample_dim(x: Tensor, source_dim: SourceDim) -> int | None:
    """Where ``x`` holds the samples, read from its graph: followed back through transposes,
    permutations and element-wise operations to a hooked call's output of ``x``'s rank; ``None``
    where the trace finds none within a few nodes."""
    if x.grad_fn is None:
        return None
    seen: set[tuple[int, int]] = set()

    def trace(node: Any, nr: int, depth: int) -> int | None:
        known = source_dim(node, nr)
        if known is not None:
            return known[0] if known[1] == x.dim() else None
        name = type(node).__name__
        if depth == 0 or (id(node), nr) in seen or (name not in MOVES and name not in _ELEMENTWISE):
            return None
        seen.add((id(node), nr))
        for child, child_nr in node.next_functions:
            inner = None if child is None else trace(child, child_nr, depth - 1)
            if inner is not None:
                return moved_by(node, inner, x.dim()) if name in MOVES else inner
        return None

    return trace(x.grad_fn, x.output_nr, _TRACE_DEPTH)
