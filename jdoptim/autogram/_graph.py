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

A call whose output is a view of a tensor it computed is also noted at that base's node
(:func:`~jdoptim.autogram._records.base_key`): the walk meets that node only when an in-place
operation on the output took the output's own node out of the graph (``ReLU(inplace=True)``
after a Linear on a 3-D input). It then takes the call from there, with the base as its output
(whose gradient is the whole output gradient, the old node's included), and drops the call
found at the output's node, if any.

Nodes are keyed by the node objects themselves, held in a set for the whole walk.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from ._records import CallRecord, Tapped, base_key, node_metadata


@dataclass
class GraphScan:
    calls: dict[CallRecord, list[GradientEdge | None]] = field(default_factory=dict)
    outside_leaves: list[Tensor] = field(default_factory=list)


def scan_graph(
    roots: list[Node],
    key: str,
    stop: Callable[[Node], Collection[int]] | None = None,
    parents: bool = False,
) -> GraphScan:
    """Walk from ``roots``; see the module docstring. With ``stop``, the inputs (indices into
    ``next_functions``) of a node outside every call that ``stop`` gives are not walked
    (:mod:`._regions`' entries of the batch into what the samples share). Split parents' calls
    are taken whole only with ``parents`` (:func:`_taken`)."""
    scan = GraphScan()
    outside: dict[int, Tensor] = {}  # the leaves met outside the calls, in the walk's order
    seen: set[Node] = set(roots)
    stack = list(roots)

    def inputs_of(record: CallRecord) -> None:
        for tensor in record.input_tensors():
            if tensor.grad_fn is not None:
                if tensor.grad_fn not in seen:
                    seen.add(tensor.grad_fn)
                    stack.append(tensor.grad_fn)
            elif tensor.requires_grad:
                outside.setdefault(id(tensor), tensor)

    own: set[int] = set()  # the parameters of calls walked into: their rules cover them
    rebased: set[CallRecord] = set()  # calls taken at their output's base (module docstring)
    base = base_key(key)
    while stack:
        node = stack.pop()
        variable = getattr(node, "variable", None)
        if variable is not None:
            if id(variable) not in own:
                outside.setdefault(id(variable), variable)
            continue
        metadata = node_metadata(node)
        if base in metadata:
            _take_at_base(scan, node, metadata[base], rebased, inputs_of)
            continue
        entries = _taken(metadata.get(key), parents, rebased)
        children = node.next_functions
        if entries:
            enter = False
            for record, out_index in entries:
                edges = scan.calls.get(record)
                if edges is None:
                    edges = scan.calls[record] = [None] * len(record.tapped)
                    inputs_of(record)
                edges[out_index] = GradientEdge(node, record.tapped[out_index].output_nr)
                if record.nested and not record.split:
                    enter = True  # hooked calls made inside it: walk into the call
                    own.update(id(p) for p in record.module.parameters())
            if not enter:
                continue
        elif stop is not None and (skipped := stop(node)):
            children = tuple(c for i, c in enumerate(children) if i not in skipped)
        for child, _ in children:
            if child is not None and child not in seen:
                seen.add(child)
                stack.append(child)
    return _finished(scan, outside, parents)


def _finished(scan: GraphScan, outside: dict[int, Tensor], parents: bool) -> GraphScan:
    """The scan with its leaves outside the calls; with ``parents``, the calls made inside a
    split parent's call dropped, wherever the walk met them (its re-run covers them)."""
    taken = [r for r in scan.calls if r.split] if parents else []
    if taken:
        inner = {id(n) for r in taken for n in r.nested}
        scan.calls = {r: e for r, e in scan.calls.items() if id(r) not in inner}
    scan.outside_leaves = list(outside.values())
    return scan


def _taken(entries: list | None, parents: bool, rebased: set[CallRecord]) -> list | None:
    """The records noted at a node that the walk takes: not those taken at their output's base,
    nor split parents' (:func:`._selection.is_split_parent`), whose nodes are then walked as any
    other and whose direct parameters are leaves outside the calls, read where the batch meets
    them (:mod:`._regions`); with ``parents``, split parents' calls are kept, as whole calls
    that the walk does not enter."""
    if not entries:
        return entries
    if rebased:
        entries = [(r, i) for r, i in entries if r not in rebased]
    if not any(r.split for r, _ in entries):
        return entries
    if parents:  # (not the calls made inside it that return its output: the walk stops here)
        inner = {id(n) for r, _ in entries if r.split for n in r.nested}
        return [(r, i) for r, i in entries if id(r) not in inner]
    return [(r, i) for r, i in entries if not r.split]


def _take_at_base(
    scan: GraphScan,
    node: Node,
    noted: list[tuple[CallRecord, Tapped]],
    rebased: set[CallRecord],
    inputs_of: Callable[[CallRecord], None],
) -> None:
    """The calls noted at their output's base ``node``: each taken with the base as its one
    output (a record of its own, which no rule reads the graph of: its node is the base's), the
    call found at its output's node dropped; their inputs walked next."""
    for record, tapped in noted:
        if record not in rebased:
            rebased.add(record)
            scan.calls.pop(record, None)
            at_base = replace(
                record, tapped=[tapped], graph_read=None, saved_packed=True, from_base=True
            )
            scan.calls[at_base] = [GradientEdge(node, tapped.output_nr)]
        inputs_of(record)
