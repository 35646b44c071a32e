r"""Where a sample-shared output meets the samples: the additions it is given to them by.

A call can be shared by the samples and still not be expandable along the batch: its consumers
need its own shape. T5's relative attention bias is ``Y = E[buckets]`` of shape
``[q, k, heads]`` (the buckets come from ``arange``, not from the batch); the model permutes it
and adds a leading dimension, ``V = Y.permute(2, 0, 1).unsqueeze(0)`` (``[1, heads, q, k]``),
and adds ``V`` to the scores ``[b, heads, q, k]`` of every attention layer (with SDPA, through a
``clone``, or a ``where`` with the causal mask, first). Swin's relative position bias
``[1, heads, N, N]`` is added to the scores of ``b·windows`` windows.

Each such addition ``Aⱼ = Xⱼ + Vⱼ`` gives ``Vⱼ`` to every sample, so sample ``i``'s gradient of
``Vⱼ`` is its own slice of ``∂ℓᵢ/∂Aⱼ`` (its ``w`` consecutive entries along the batch dimension
summed, for ``b·w`` folded windows), and by the chain rule

.. math::  \frac{∂ℓᵢ}{∂θ} = \sum_j \Big(\frac{∂Vⱼ}{∂θ}\Big)^{\!⊤} \Big[\frac{∂ℓᵢ}{∂Aⱼ}\Big]_i ,
           \qquad Vⱼ = pⱼ(f(θ)),

with ``pⱼ`` the shape operations on the path from the call's output to addition ``j``. (An
``Aⱼ`` computed from another addition's output, as layer 2's scores are from layer 1's, is no
double count: the backward's gradient at ``Aⱼ`` holds everything downstream of it, and ``Vⱼ``
enters ``Aⱼ`` only there.) So one backward to the additions' outputs gives the per-sample
gradients, and the call is re-run with each path replayed (the generic rule). The forward is
unchanged, and the engine's check proves the reading on the first step of a structure.

:func:`addition_paths` finds the paths: every use of the output must lead, through replayable
shape operations only (``permute``, ``unsqueeze``, ``view``/``reshape``, ``transpose``,
``clone``, ``select`` and ``slice`` (a layer's part of a stacked output, as YOLOS's
per-layer position embeddings), and ``where``/``masked_fill`` with a constant other branch that
keeps the shape), to
a plain addition (alpha 1) of an operand with size 1 along the batch dimension whose sum has
``b`` (or ``w·b``, sample-major) entries there and the operand's other sizes; with
``batch_dim = 0``, to one that broadcasts the operand along a new leading dimension (nanoGPT's
``[t, d]`` positions added to ``[b, t, d]`` tokens: the path ends with an ``unsqueeze(0)``); or
to an ``expand`` of that operand along the batch dimension alone whose copies (``contiguous``)
are added so (MPNet's relative bias), which is the same addition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

from ._sample_trace import saved_dim, saved_int

__all__ = ["AdditionPath", "addition_paths", "all_additions", "consumer_map", "replay"]

#: the longest chain of shape operations followed from a call's output to an addition
_MAX_OPS = 8

Op = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdditionPath:
    """One use of a shared output: the shape operations to the added operand (its ``shape``), and
    the addition's node and output shape."""

    ops: tuple[Op, ...]
    shape: torch.Size
    addition: Node
    summed: torch.Size


def consumer_map(
    roots: list[Node], targets: set[Node] | None = None
) -> dict[Node, list[tuple[Node, int]]]:
    """For every node under ``roots`` (or only for ``targets``, each listed even when unused),
    the nodes that take its output as an input, with the input's position (one walk of the
    graph)."""
    found: dict[Node, list[tuple[Node, int]]] = {}
    if targets is not None:
        found = {t: [] for t in targets}
    seen = set(roots)
    stack = list(roots)
    while stack:
        node = stack.pop()
        for position, (child, _) in enumerate(node.next_functions):
            if child is None:
                continue
            if targets is None:
                found.setdefault(child, []).append((node, position))
            elif child in targets:
                found[child].append((node, position))
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def _output_shape(node: Node) -> torch.Size:
    return node._input_metadata[0].shape  # the shape of the gradient it takes: its output's


def _shape_op(node: Node, position: int, shape: torch.Size) -> Op | None:
    """The forward of ``node`` as a function of its input at ``position`` (of ``shape``), when it
    is a replayable shape operation (see the module docstring), else ``None``."""
    name = type(node).__name__
    out = tuple(_output_shape(node))
    if position != 0 or len(node.next_functions) > 2:
        return None
    saved: Any = node  # the saved attributes of autograd's generated node classes
    if name == "PermuteBackward0":
        dims = tuple(saved._saved_dims)
        return lambda x: x.permute(dims)
    if name == "UnsqueezeBackward0":
        dim = saved._saved_dim
        return lambda x: x.unsqueeze(dim)
    if name == "TransposeBackward0":
        first, second = saved._saved_dim0, saved._saved_dim1
        return lambda x: x.transpose(first, second)
    if name in ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"):
        return lambda x: x.reshape(out)
    if name in ("CloneBackward0", "AliasBackward0"):
        return lambda x: x
    if name in ("SelectBackward0", "SliceBackward0"):  # (YOLOS adds its layer's slice)
        return _taken_part(saved, len(shape))
    if tuple(shape) != out:  # a where or masked_fill that broadcasts the output: not followed
        return None
    if name == "WhereBackward0" and node.next_functions[1][0] is None:  # constant other branch
        condition = saved._saved_condition.detach().clone()  # the saved one is freed by backward
        return lambda x: torch.where(condition, x, 0.0)
    if name == "MaskedFillBackward0":
        mask = saved._saved_mask.detach().clone()
        return lambda x: x.masked_fill(mask, 0.0)
    return None


def _taken_part(saved: Any, rank: int) -> Op:
    """The forward of a ``select`` (``x[i]``) or ``slice`` (``x[:, a:e:s]``) node."""
    dim = saved_dim(saved._saved_dim, rank)
    if type(saved).__name__ == "SelectBackward0":
        index = saved_int(saved._saved_index)
        return lambda x: x.select(dim, index)
    start, end, step = saved_int(saved._saved_start), saved_int(saved._saved_end), saved._saved_step
    return lambda x: x[(slice(None),) * dim + (slice(start, end, step),)]


def _addition(node: Node, shape: torch.Size, b: int, batch_dim: int) -> torch.Size | None:
    """The output shape of ``node`` when it is the plain addition that gives an operand of
    ``shape`` (size 1 along ``batch_dim``) to ``b`` samples (``w·b`` entries sample-major), else
    ``None``."""
    if type(node).__name__ != "AddBackward0" or len(node.next_functions) != 2:
        return None
    if getattr(node, "_saved_alpha", 1) != 1:
        return None
    out = _output_shape(node)
    if len(out) != len(shape) or len(shape) <= batch_dim or shape[batch_dim] != 1:
        return None
    same = all(o == s for d, (o, s) in enumerate(zip(out, shape)) if d != batch_dim)
    samples = out[batch_dim] >= b and out[batch_dim] % b == 0
    return torch.Size(out) if same and samples else None


def _unsqueeze_leading(tensor: Tensor) -> Tensor:
    return tensor.unsqueeze(0)


def _leading_addition(
    node: Node, shape: torch.Size, b: int, batch_dim: int
) -> tuple[torch.Size, Node, torch.Size] | None:
    """With ``batch_dim = 0``, when ``node`` is the plain addition that broadcasts an operand of
    ``shape`` (no samples' dimension: ``[t, d]``) to ``b`` samples along a new leading one
    (``[b, t, d]``): the operand's shape with that dimension (``[1, t, d]``), the node and its
    output shape, as :func:`_addition` gives them for the operand unsqueezed."""
    if batch_dim != 0 or type(node).__name__ != "AddBackward0":
        return None
    out = _output_shape(node)
    if len(out) != len(shape) + 1:
        return None
    unsqueezed = torch.Size((1, *shape))
    summed = _addition(node, unsqueezed, b, batch_dim)
    return None if summed is None else (unsqueezed, node, summed)


def _through_batch_expansion(
    node: Node,
    position: int,
    shape: torch.Size,
    consumers: dict[Node, list[tuple[Node, int]]],
    b: int,
    batch_dim: int,
) -> list[tuple[Node, torch.Size]] | None:
    """When ``node`` expands an operand of ``shape`` (size 1 along ``batch_dim``) to the samples
    along that dimension alone (MPNet's relative bias, ``bias.expand(b, -1, q, k).contiguous()``
    added to the ``[b, heads, q, k]`` scores), and every use of the expanded tensor reaches a
    plain addition of that shape through copies only (``contiguous``, ``clone``): those
    additions with their output shapes, as :func:`_addition` gives them for the operand
    unexpanded (adding the expansion is adding the operand, broadcast); else ``None``."""
    if type(node).__name__ != "ExpandBackward0" or position != 0:
        return None
    out = _output_shape(node)
    if len(out) != len(shape) or any(
        o != s for d, (o, s) in enumerate(zip(out, shape)) if d != batch_dim
    ):
        return None
    found: list[tuple[Node, torch.Size]] = []
    stack = [node]
    while stack:
        users = consumers.get(stack.pop(), [])
        if not users:
            return None
        for user, _ in users:
            summed = _addition(user, shape, b, batch_dim)
            if summed is not None and tuple(summed) == tuple(out):
                found.append((user, summed))
            elif type(user).__name__ in ("CloneBackward0", "AliasBackward0"):
                stack.append(user)
            else:
                return None
    return found


def all_additions(users: list[tuple[Node, int]], shape: torch.Size, b: int, batch_dim: int) -> bool:
    """Whether every one of ``users`` adds an operand of ``shape`` to the samples directly (no
    shape operation between): the consumers of that one node are then all the walk needs."""
    return bool(users) and all(_addition(user, shape, b, batch_dim) for user, _ in users)


def addition_paths(
    node: Node,
    shape: torch.Size,
    consumers: dict[Node, list[tuple[Node, int]]],
    b: int,
    batch_dim: int,
) -> list[AdditionPath] | None:
    """Every use of the output of ``node`` (of ``shape``) as paths to additions that give it to
    the ``b`` samples (module docstring), or ``None`` when some use is not such a path."""
    paths: list[AdditionPath] = []

    def follow(current: Node, ops: tuple[Op, ...], current_shape: torch.Size) -> bool:
        users = consumers.get(current, [])
        if not users or len(ops) > _MAX_OPS:
            return False
        for user, position in users:
            summed = _addition(user, current_shape, b, batch_dim)
            if summed is not None:
                paths.append(AdditionPath(ops, current_shape, user, summed))
                continue
            leading = _leading_addition(user, current_shape, b, batch_dim)
            if leading is not None:  # (nanoGPT's [t, d] positions added to [b, t, d] tokens)
                paths.append(AdditionPath((*ops, _unsqueeze_leading), *leading))
                continue
            expanded = _through_batch_expansion(
                user, position, current_shape, consumers, b, batch_dim
            )
            if expanded is not None:
                paths.extend(AdditionPath(ops, current_shape, a, out) for a, out in expanded)
                continue
            op = _shape_op(user, position, current_shape)
            if op is None or not follow(user, (*ops, op), _output_shape(user)):
                return False
        return True

    return paths if follow(node, (), shape) else None


def replay(ops: tuple[Op, ...], tensor: Tensor) -> Tensor:
    """``tensor`` through a path's shape operations."""
    for op in ops:
        tensor = op(tensor)
    return tensor
