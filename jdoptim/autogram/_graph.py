r"""One walk of the losses' autograd graph: which recorded calls, which leaves outside them.

From the losses' ``grad_fn`` nodes, the walk follows ``next_functions``; at a node that carries a
:class:`~jdoptim.autogram._records.CallRecord` it does not enter the call (its inner nodes are the
business of the layer rule) but jumps to the ``grad_fn`` of the call's input tensors, unless
hooked calls were made inside it (``CallRecord.nested``: peft's DoRA calls the LoRA layers it is
handed inside its magnitude module's call): then it walks into the call as well, to find them,
and the call's own parameters met there are its rule's. So it sees

* every call whose outputs the losses reach, with a :class:`GradientEdge` per reached output;
* every leaf reached *outside* a call (a parameter used directly in a parent's ``forward``, a
  weight tied into an unhooked module, ...): those parameters get their Jacobian rows straight
  from autograd, which keeps the Gramian exact whatever the model does.

Nodes are keyed by the node objects themselves, held in a set for the whole walk.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._records import CallRecord, node_metadata


@dataclass
class GraphScan:
    calls: dict[CallRecord, list[GradientEdge | None]] = field(default_factory=dict)
    outside_leaves: list[Tensor] = field(default_factory=list)


def scan_graph(roots: list[Node], key: str) -> GraphScan:
    """Walk from ``roots``; see the module docstring."""
    scan = GraphScan()
    outside_ids: set[int] = set()
    seen: set[Node] = set(roots)
    stack = list(roots)

    def leaf(tensor: Tensor) -> None:
        if id(tensor) not in outside_ids:
            outside_ids.add(id(tensor))
            scan.outside_leaves.append(tensor)

    own: set[int] = set()  # the parameters of calls walked into: their rules cover them
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in own:
                leaf(variable)
            continue
        entries = node_metadata(node).get(key)
        if entries:
            enter = False
            for record, out_index in entries:
                edges = scan.calls.get(record)
                if edges is None:
                    edges = scan.calls[record] = [None] * len(record.tapped)
                    for tensor in record.input_tensors():
                        if tensor.grad_fn is not None:
                            if tensor.grad_fn not in seen:
                                seen.add(tensor.grad_fn)
                                stack.append(tensor.grad_fn)
                        elif tensor.requires_grad:
                            leaf(tensor)
                edges[out_index] = GradientEdge(node, record.tapped[out_index].output_nr)
                if record.nested:  # hooked calls made inside it: walk into the call
                    enter = True
                    own.update(id(p) for p in record.module.parameters())
            if not enter:
                continue
        for child, _ in node.next_functions:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return scan
