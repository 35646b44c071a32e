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

from torch import Tensor
from torch.autograd.graph import Node

__all__ = ["collect_loss_leaves", "iter_tensors", "leaf_reach"]


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


def _children(node: Node) -> Iterator[Node]:
    for child, _ in node.next_functions:
        if child is not None:
            yield child


def _leaf_of(node: Node) -> Tensor | None:
    return getattr(node, "variable", None)


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

    # Pass 1: every node reachable from a root, and the number of its parents in that subgraph.
    in_degree: dict[Node, int] = {}
    stack = [node for node, _ in roots]
    for node in stack:
        in_degree.setdefault(node, 0)
    seen = set(stack)
    met: list[Tensor] = []  # the leaves, in the order first met
    while stack:
        node = stack.pop()
        leaf = _leaf_of(node)
        if leaf is not None:
            met.append(leaf)
        for child in _children(node):
            in_degree[child] = in_degree.get(child, 0) + 1
            if child not in seen:
                seen.add(child)
                stack.append(child)
    if len(roots) == 1 and not direct:  # one root reaches every leaf met: no masks to propagate
        return [(leaf, roots[0][1]) for leaf in met]

    # Pass 2: propagate the loss bitmasks from parents to children in topological order.
    for node, bit in roots:
        masks[node] = masks.get(node, 0) | bit
    ready = [node for node, degree in in_degree.items() if degree == 0]
    leaves: dict[Node, int] = {}
    while ready:
        node = ready.pop()
        mask = masks.pop(node, 0)
        if _leaf_of(node) is not None:
            leaves[node] = leaves.get(node, 0) | mask
        for child in _children(node):
            masks[child] = masks.get(child, 0) | mask
            in_degree[child] -= 1
            if in_degree[child] == 0:
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
