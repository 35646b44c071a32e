"""Autograd-graph introspection: which leaf parameters does each loss reach?

The walk follows ``grad_fn.next_functions`` from each loss down to the ``AccumulateGrad`` nodes,
whose ``.variable`` is the leaf tensor that ``backward()`` would accumulate into. Visited nodes are
keyed by the node objects themselves (held in a set, so they stay alive during the walk and their
identities cannot be reused), never by the ``id()`` of a short-lived wrapper.

For several losses, one topological pass labels every node with the bitmask of the losses that
reach it, so a subgraph shared by all the losses (a trunk) is walked once, not once per loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor
from torch.autograd.graph import Node

__all__ = [
    "HeadsMap",
    "collect_loss_leaves",
    "iter_tensors",
    "leaf_reach",
    "leaf_reach_through",
    "map_heads",
]


def iter_tensors(obj: object) -> Iterator[Tensor]:
    """Yield the tensors of ``obj``: a tensor, a mapping or an iterable, or nests of them.

    Anything else (numbers, strings, ``None``) is ignored.
    """
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for value in obj.values():
            yield from iter_tensors(value)
    elif isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        for item in obj:
            yield from iter_tensors(item)


def _children(node: Node) -> list[Node]:
    return [child for child, _ in node.next_functions if child is not None]


def _leaf_of(node: Node) -> Tensor | None:
    return getattr(node, "variable", None)


def _leaves_below(root: Node) -> list[Tensor]:
    """The leaves reachable from ``root``, in the order first met (one walk, no in-degrees)."""
    stack = [root]
    seen = {root}
    met: list[Tensor] = []
    while stack:
        node = stack.pop()
        leaf = getattr(node, "variable", None)
        if leaf is not None:
            met.append(leaf)
            continue
        for child, _ in node.next_functions:  # (inlined: the walk visits every node)
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return met


def leaf_reach(losses: Sequence[Tensor]) -> list[tuple[Tensor, int]]:
    """Return ``(leaf, mask)`` pairs; bit ``i`` of ``mask`` is set iff ``losses[i]`` reaches it.

    Leaves are listed once each, in the order first met; a loss without a graph reaches nothing.
    """
    roots: list[tuple[Node, int]] = [
        (loss.grad_fn, 1 << index) for index, loss in enumerate(losses) if loss.grad_fn is not None
    ]
    masks: dict[Node, int] = {}
    # Leaf tensors that are themselves losses (a loss that *is* a parameter) have no grad_fn.
    direct = [(loss, 1 << i) for i, loss in enumerate(losses) if loss.grad_fn is None]
    if len(roots) == 1 and not direct:  # one root reaches every leaf met: no masks to propagate
        return [(leaf, roots[0][1]) for leaf in _leaves_below(roots[0][0])]

    # Pass 1: every node reachable from a root, and the number of its parents in that subgraph.
    # Losses can share a root node (``list(vector)``, ``torch.unbind``: outputs of one node):
    # each node is walked once, or its children would count it as a parent twice.
    # Each node's children are read once (``next_functions`` builds a tuple of wrappers at every
    # access, the walk's main cost) and kept for pass 2.
    in_degree: dict[Node, int] = {}
    children: dict[Node, list[Node]] = {}
    stack = list(dict.fromkeys(node for node, _ in roots))
    for node in stack:
        in_degree.setdefault(node, 0)
    while stack:
        node = stack.pop()
        kids = children[node] = _children(node)
        for child in kids:
            degree = in_degree.get(child)
            if degree is None:  # (met for the first time: a node is seen once it has a degree)
                in_degree[child] = 1
                stack.append(child)
            else:
                in_degree[child] = degree + 1

    # Pass 2: propagate the loss bitmasks from parents to children in topological order.
    for node, bit in roots:
        masks[node] = masks.get(node, 0) | bit
    ready = [node for node, degree in in_degree.items() if degree == 0]
    leaves: dict[Node, int] = {}
    while ready:
        node = ready.pop()
        mask = masks.pop(node, 0)
        kids = children[node]
        if not kids:  # (a leaf's node has no inputs: the slower getattr only there)
            if _leaf_of(node) is not None:
                leaves[node] = leaves.get(node, 0) | mask
            continue
        for child in kids:
            masks[child] = masks.get(child, 0) | mask
            degree = in_degree[child] - 1
            in_degree[child] = degree
            if degree == 0:
                ready.append(child)

    result = [(_leaf_of(node), mask) for node, mask in leaves.items()]
    result.extend((loss, bit) for loss, bit in direct if loss.requires_grad)
    return result  # type: ignore[return-value]


def collect_loss_leaves(losses: object) -> set[Tensor]:
    """Return the leaf tensors (typically ``nn.Parameter``\\ s) that ``backward()`` would reach.

    Args:
        losses: a tensor, a sequence or mapping of tensors, or nests of them; non-tensors are
            ignored. Leaves with ``requires_grad=False`` and detached subtrees contribute nothing.
    """
    return {leaf for leaf, _ in leaf_reach(list(iter_tensors(losses)))}


# -- graphs with a shared representation z (``opt.step(losses, features=z)``) --------------------


@dataclass
class HeadsMap:
    """The part of the graph between the losses and a representation ``z`` (the *heads*), from
    one walk.

    Attributes:
        consumers: each node that takes ``z`` as an input, with the loss it belongs to and the
            positions of ``z`` among its inputs.
        around: the ``id`` of each leaf reached by a path that does not pass through ``z`` (the
            leaves stay alive: their nodes are held in ``leaves``).
        exclusive: no node of the heads is reached by two losses (separate heads), so that the
            gradient a consumer sends to ``z`` comes from its one loss.
        leaves: each leaf node met in the heads, with the index of its loss (complete only when
            ``exclusive``).
        cut: ``z``'s node and output number, where the walk stopped.
    """

    consumers: dict[Node, tuple[int, list[int]]] = field(default_factory=dict)
    around: set[int] = field(default_factory=set)
    exclusive: bool = True
    leaves: dict[Node, int] = field(default_factory=dict)
    cut: tuple[Node | None, int] = (None, 0)


def map_heads(roots: Sequence[Tensor], features: Tensor) -> HeadsMap:
    """Walk from each loss down to ``z`` (see :class:`HeadsMap`).

    The walk stops on the edge into ``features``' own output of its node (``output_nr``); an
    edge into a sibling output of the same node (another chunk of a split) is followed. A node
    met by a second loss is not walked again (its descendants are known) and marks the heads
    as not exclusive. Nodes are held during the walk, so their identities stay valid.
    """
    cut_node, cut_number = features.grad_fn, features.output_nr
    heads = HeadsMap(cut=(cut_node, cut_number))
    owner: dict[Node, int] = {}
    for index, loss in enumerate(roots):
        if loss.grad_fn is None:
            continue
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node in owner:
                heads.exclusive = heads.exclusive and owner[node] == index
                continue
            owner[node] = index
            leaf = getattr(node, "variable", None)
            if leaf is not None:
                heads.around.add(id(leaf))
                heads.leaves[node] = index
            for slot, (child, number) in enumerate(node.next_functions):
                if child is cut_node and number == cut_number:
                    heads.consumers.setdefault(node, (index, []))[1].append(slot)
                elif child is not None:
                    stack.append(child)
    return heads


def leaf_reach_through(
    losses: Sequence[Tensor], features: Tensor
) -> tuple[list[tuple[Tensor, int]] | None, HeadsMap]:
    """:func:`leaf_reach` for losses computed from a representation ``z`` (``features``), and
    the :class:`HeadsMap`, from one walk of the heads and one walk below ``z``.

    With exclusive heads, a path from loss ``i`` to a leaf either stays in loss ``i``'s heads
    (the leaf was met there: bit ``i``) or enters ``z`` through one of loss ``i``'s consumers
    (the leaf is below ``z``: bit ``i`` for every loss with a consumer), so the masks are
    exact; the reach is ``None`` (use :func:`leaf_reach`) when the heads are not exclusive or
    a loss is itself a leaf.
    """
    heads = map_heads(losses, features)
    if not heads.exclusive or any(loss.grad_fn is None for loss in losses):
        return None, heads
    masks: dict[Node, int] = {node: 1 << index for node, index in heads.leaves.items()}
    through = 0
    for index, _ in heads.consumers.values():
        through |= 1 << index
    if through:
        stack: list[Node] = [features.grad_fn]  # type: ignore[list-item]
        seen = set(stack)
        while stack:
            node = stack.pop()
            if getattr(node, "variable", None) is not None:
                masks[node] = masks.get(node, 0) | through
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    stack.append(child)
    # Every node in `masks` is a leaf's node (its `variable` is set).
    reach = [(leaf, mask) for node, mask in masks.items() if (leaf := _leaf_of(node)) is not None]
    return reach, heads
