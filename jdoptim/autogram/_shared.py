r"""Calls shared by the samples, expanded along the batch so that per-sample mode stays exact.

In per-sample mode (``batch_dim``) a hooked call whose output has size 1 along ``batch_dim``
while the forward's batch has ``b > 1`` samples (GPT-2's and BERT's position embedding
``wpe(arange(s)[None])`` of shape ``[1, s, d]``; BART's decoder position embedding, which takes
the batch's token ids for their shape only) is *sample-shared*: its output ``Y`` is the same for
every sample, and one backward pass gives only
``Σᵢ ∂ℓᵢ/∂Y``. If the forward hook returns ``E = Y.expand(b, …)`` instead, and every consumer
of ``Y`` broadcasts it against an operand that has the ``b`` samples along that dimension
(``tok + pos``), the forward computes the same values in the same shapes, and the backward to
``E`` gives ``∂ℓᵢ/∂Eᵢ``, each sample's own gradient. The call is then recorded with its inputs
expanded the same way, so that its rule sees ``b`` samples, ``Eᵢ = f(xᵢ)``.

Whether the consumers broadcast is read off the losses' graph, so the hook expands a module's
calls only once a step has seen them, unexpanded, consumed by broadcasting element-wise
operations only (:func:`learn`; that first step reads the calls at the additions that give
them to the samples, below, where those are its consumers, and else takes the exact
row-per-loss route). The
engine's check then proves the expanded route on the first step of its structure, and at every
step :func:`unsafe_expansions` verifies again that every consumer of an expanded output
broadcasts it against a batched operand (one walk of the graph, about 0.15 ms for GPT-2 tiny);
a consumer that does not (the code took another path) gets a clear error before anything is
changed, and the module is not expanded again.

A shared output that cannot be expanded is read at the additions that give it to the samples
instead (:func:`tap_additions`, :mod:`._additions`): Swin's relative position bias
``[1, heads, N, N]`` added to the scores of ``b·windows`` windows (expanding it would need the
window count at the call), T5's ``[q, k, heads]`` bias permuted to ``[1, heads, q, k]`` and added
to every layer's scores (its consumers need its own shape). Each sum's gradient, summed over
each sample's entries, is that sample's gradient of the added operand; nothing in the forward
changes, so this holds from the first step, and the engine's check proves it.

The batch size ``b`` of a forward is read by a forward pre-hook on the modules given to the
engine: the size along ``batch_dim`` of their tensor inputs, when they all agree. A call made
outside such a forward (or one with no tensor argument of batch size) is not expanded.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node
from torch.utils._pytree import tree_map

from ..introspection import iter_tensors
from ._additions import AdditionPath, addition_paths, all_additions, consumer_map

if TYPE_CHECKING:  # _records imports this module
    from ._records import CallRecord

#: consumers that broadcast their operands element-wise (their output has the broadcast shape)
_BROADCASTING = frozenset({"AddBackward0", "SubBackward0", "MulBackward0", "DivBackward0"})


_REPLAY = threading.local()


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """While a rule re-runs a module's forward (the generic rule), its hooks expand nothing."""
    _REPLAY.depth = getattr(_REPLAY, "depth", 0) + 1
    try:
        yield
    finally:
        _REPLAY.depth -= 1


def is_replaying() -> bool:
    return getattr(_REPLAY, "depth", 0) > 0


@dataclass(eq=False)
class SharedCalls:
    """What the hooks share about sample-shared calls (no reference to the engine)."""

    batch_dim: int
    #: the batch size of each running forward of an engine module (outermost first)
    sizes: list[int | None] = field(default_factory=list)
    #: ids of the modules whose sample-shared calls the hook expands, each with whether the
    #: samples' dimension is a new leading one (``[t, d] → [b, t, d]``, ``batch_dim = 0``) or
    #: the output's own dimension of size 1 (``[1, s, d] → [b, s, d]``)
    expandable: dict[int, bool] = field(default_factory=dict)
    #: ids of the modules :func:`learn` has looked at (each is looked at once)
    decided: set[int] = field(default_factory=set)
    #: ids of the modules whose sample-shared output reaches the samples through additions only
    #: (Swin's relative position bias on the scores of ``b·windows`` windows, T5's permuted
    #: relative bias on every layer's scores): their per-sample gradient is read at those
    #: additions (:func:`tap_additions`), the forward is not changed
    read_at_additions: set[int] = field(default_factory=set)
    #: those of them whose paths to the additions had shape operations (T5's permuted bias): the
    #: walk then needs every node's consumers, not only the calls'
    through_shape_ops: set[int] = field(default_factory=set)
    #: ids of the modules :func:`learn` has just found expandable whose calls of this step (made
    #: unexpanded) are each given to the samples by additions: :func:`tap_additions` reads them
    #: there in this step (GPT-2's and nanoGPT's position embeddings), so that the step that
    #: learns the expansion is a per-sample one too, not one backward row per loss (``b`` rows
    #: through the whole model: 1.9 GB and 4 s for GPT-2 tiny's first step at batch 128, out of
    #: memory at 512); cleared by it
    added_this_step: set[int] = field(default_factory=set)
    #: ids of the modules expanded once and then refused (:func:`unsafe_expansions`), whose
    #: error said that their steps take the exact slower route from then on
    no_longer_expanded: set[int] = field(default_factory=set)

    def batch_size(self) -> int | None:
        return self.sizes[0] if self.sizes else None


def batch_of(args: tuple, kwargs: dict, batch_dim: int) -> int | None:
    """The size along ``batch_dim`` of the tensor arguments (of more than ``batch_dim``
    dimensions) when they all agree, else ``None``."""
    sizes = {t.shape[batch_dim] for t in iter_tensors((args, kwargs)) if t.dim() > batch_dim}
    return sizes.pop() if len(sizes) == 1 else None


_PreHook = Callable[[nn.Module, tuple, dict], None]
_Hook = Callable[[nn.Module, tuple, dict, Any], None]


def make_root_hooks(state: SharedCalls) -> tuple[_PreHook, _Hook]:
    """A forward pre-hook and hook for the engine's modules: they keep :attr:`SharedCalls.sizes`."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state.sizes.append(batch_of(args, kwargs, state.batch_dim))

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if state.sizes:
            state.sizes.pop()

    return pre_hook, hook


def is_shared(output: Any, batch_dim: int) -> bool:
    """A call whose output is one tensor with size 1 along ``batch_dim`` (in a forward of
    ``b > 1`` samples): one value for every sample, whatever its inputs (BART's decoder position
    embedding takes the ``[b, s]`` token ids for their shape and returns ``[1, s, d]``). Whether
    its consumers broadcast it against the samples is read from the graph (:func:`learn`); an
    output that summarises the batch (a mean over the samples) makes the other modules' losses
    depend on every sample, which the engine's check finds."""
    return isinstance(output, Tensor) and output.dim() > batch_dim and output.shape[batch_dim] == 1


def expand_along(tensor: Tensor, batch_dim: int, b: int, new: bool) -> Tensor:
    """``tensor`` expanded to ``b`` along ``batch_dim`` (a view): along its own dimension of
    size 1, or (``new``) along a new leading one."""
    if new:
        return tensor.unsqueeze(0).expand(b, *tensor.shape)
    shape = list(tensor.shape)
    shape[batch_dim] = b
    return tensor.expand(shape)


def expand_inputs(
    args: tuple, kwargs: dict, batch_dim: int, b: int, new: bool
) -> tuple[tuple, dict, bool]:
    """The call's tensor arguments expanded as its output is (views, no copy), and whether all
    of them were: along a new leading dimension every tensor is; along its own dimension only
    those of size 1 there (BART's decoder position embedding also takes the ``[b, s]`` token
    ids, for their shape, and a ``[s]`` vector of positions: those stay as they are)."""
    complete = True

    def grow(x: Any) -> Any:
        nonlocal complete
        if not isinstance(x, Tensor):
            return x
        if new or (x.dim() > batch_dim and x.shape[batch_dim] == 1):
            return expand_along(x, batch_dim, b, new)
        complete = False
        return x

    if not kwargs and all(isinstance(x, Tensor) for x in args):  # (a layer's call: no pytrees)
        return tuple(grow(x) for x in args), {}, complete
    grown_args, grown_kwargs = tree_map(grow, args), tree_map(grow, kwargs)
    return grown_args, grown_kwargs, complete


def _operand_shape(consumer: Node, position: int) -> torch.Size | None:
    child, nr = consumer.next_functions[position]
    if child is None:
        return None
    variable = getattr(child, "variable", None)
    if variable is not None:
        return variable.shape
    metadata = child._input_metadata
    return metadata[nr].shape if nr < len(metadata) else None


def _broadcasts(consumer: Node, position: int, full: torch.Size, batch_dim: int) -> bool:
    """``consumer`` is an element-wise broadcasting operation whose output has shape ``full``
    (the shared output's with ``b`` along ``batch_dim``) and whose other operand has the ``b``
    samples along that dimension: then the shared output, expanded or not, gives it the same
    values."""
    if type(consumer).__name__ not in _BROADCASTING or len(consumer.next_functions) != 2:
        return False
    if tuple(consumer._input_metadata[0].shape) != tuple(full):
        return False
    other = _operand_shape(consumer, 1 - position)
    if other is None:
        return False
    aligned = batch_dim - (len(full) - len(other))  # right-aligned broadcasting
    return 0 <= aligned < len(other) and other[aligned] == full[batch_dim]


def _roots(losses: Tensor) -> list[Node]:
    """The losses' node, where the walks start (a step's losses are never leaves)."""
    assert losses.grad_fn is not None
    return [losses.grad_fn]


def _safe(losses: Tensor, nodes: dict[Node, torch.Size], batch_dim: int) -> dict[Node, bool]:
    consumers = consumer_map(_roots(losses), set(nodes))
    return {
        node: bool(consumers[node])
        and all(_broadcasts(c, pos, full, batch_dim) for c, pos in consumers[node])
        for node, full in nodes.items()
    }


def _modes(
    record: CallRecord, b: int, batch_dim: int
) -> tuple[torch.Size | None, torch.Size | None]:
    """The consumers' output shape that shows ``record``'s output shared by the samples: with
    ``b`` along its own dimension of size 1, and along a new leading dimension."""
    shape = record.tapped[0].shape
    own = None
    if record.shareable:
        full = list(shape)
        full[batch_dim] = b
        own = torch.Size(full)
    new = torch.Size((b, *shape)) if batch_dim == 0 else None
    return own, new


def learn(state: SharedCalls, scan_calls: dict, losses: Tensor, b: int) -> None:
    """Looks once at each module's calls in this step (unexpanded): a module whose every call
    has one tensor output, consumed only by broadcasting operations against the ``b`` samples
    (along its own dimension of size 1, or along a new leading dimension), is added to
    :attr:`SharedCalls.expandable`. One walk of the graph, on a module's first step only."""
    if b <= 1:
        return
    fresh = [
        (record, None if edges[0] is None else edges[0].node)
        for record, edges in scan_calls.items()
        if id(record.module) not in state.decided and not record.expanded
    ]
    if not fresh:
        return
    modes = {id(r): _modes(r, b, state.batch_dim) for r, _ in fresh}
    usable = {id(r): n for r, n in fresh if len(r.tapped) == 1 and n is not None}
    consumers = consumer_map(_roots(losses))
    found: dict[int, set[bool | str | None]] = {}
    readable = {id(r.module) for r, _ in fresh}  # (those with a call not so read: removed)
    for record, node in fresh:
        kinds = found.setdefault(id(record.module), set())
        if node is None or id(record) not in usable:
            kinds.add(None)
            continue
        used = consumers.get(node, [])
        own, new = modes[id(record)]
        kind: bool | str | None = None
        for flag, full in ((False, own), (True, new)):
            if (
                full is not None
                and used
                and all(_broadcasts(c, pos, full, state.batch_dim) for c, pos in used)
            ):
                kind = flag
        added = _read_at_additions(record, node, consumers, b, state.batch_dim) is not None
        if kind is None and added:
            kind = "added"
        kinds.add(kind)
        if not added:
            readable.discard(id(record.module))
    for module_id, kinds in found.items():
        state.decided.add(module_id)
        if kinds == {"added"}:
            state.read_at_additions.add(module_id)
        elif len(kinds) == 1 and None not in kinds:
            state.expandable[module_id] = kinds.pop()  # type: ignore[assignment]
            if module_id in readable:
                state.added_this_step.add(module_id)


def _read_at_additions(
    record: CallRecord, node: Node, consumers: dict, b: int, batch_dim: int
) -> list[AdditionPath] | None:
    """The paths from the call's one output to the additions that give it to the ``b`` samples
    (:mod:`._additions`), when every use of the output is one, else ``None``."""
    if len(record.tapped) != 1 or len(node._input_metadata) != 1:  # (one output per node)
        return None
    return addition_paths(node, record.tapped[0].shape, consumers, b, batch_dim)


def tap_additions(state: SharedCalls, scan_calls: dict, losses: Tensor, b: int) -> None:
    """For each call of :attr:`SharedCalls.read_at_additions` in this step, record it as seen
    through the additions that give its output to the samples (:mod:`._additions`): its tapped
    outputs become the sums (``b``, or ``w·b`` sample-major, entries along the batch dimension),
    whose gradients the backward gives per sample, with the shape operations of each path
    (:attr:`CallRecord.paths`); the call is marked expanded with its own arguments kept
    (``unexpanded``), so that the generic rule re-runs it as it was made, replays each path and
    sums each sample's entries. A call whose output is not used that way in this forward is left
    as it is (one backward row per loss, exact). Rewrites ``scan_calls`` in place; one walk of
    the graph when there is such a call."""
    read = state.read_at_additions | state.added_this_step
    state.added_this_step = set()
    if not read or b <= 1:
        return
    nodes = {
        edges[0].node: record
        for record, edges in scan_calls.items()
        if id(record.module) in read
        and not record.expanded
        and len(edges) == 1
        and edges[0] is not None
    }
    if not nodes:
        return
    # The consumers of the calls' nodes; of every node only when some path has shape operations
    # (Swin's bias is added directly; T5's is permuted first).
    if any(id(record.module) in state.through_shape_ops for record in nodes.values()):
        consumers = consumer_map(_roots(losses))
    else:
        consumers = consumer_map(_roots(losses), set(nodes))
        shapes = {node: record.tapped[0].shape for node, record in nodes.items()}
        if not all(all_additions(consumers[n], shapes[n], b, state.batch_dim) for n in nodes):
            consumers = consumer_map(_roots(losses))
    for node, record in nodes.items():
        paths = _read_at_additions(record, node, consumers, b, state.batch_dim)
        if not paths:
            continue
        if any(path.ops for path in paths):
            state.through_shape_ops.add(id(record.module))
        tapped = record.tapped[0]
        seen = replace(
            record,
            tapped=[tapped._replace(shape=path.summed, output_nr=0) for path in paths],
            expanded=True,
            unexpanded=(record.args, record.kwargs, tapped.shape, state.batch_dim),
            inputs_expanded=False,
            paths=tuple((path.ops, path.shape) for path in paths),
        )
        del scan_calls[record]
        scan_calls[seen] = [GradientEdge(path.addition, 0) for path in paths]


def unsafe_expansions(state: SharedCalls, scan_calls: dict, losses: Tensor) -> list[nn.Module]:
    """The modules of this step's expanded calls whose output some consumer does not broadcast
    against the samples (they are no longer expanded from now on)."""
    nodes = {
        edges[0].node: record.tapped[0].shape
        for record, edges in scan_calls.items()
        if record.expanded and edges[0] is not None
    }
    if not nodes:
        return []
    safe = _safe(losses, nodes, state.batch_dim)
    bad = [
        record.module
        for record, edges in scan_calls.items()
        if record.expanded and edges[0] is not None and not safe[edges[0].node]
    ]
    for module in bad:
        state.expandable.pop(id(module), None)
        state.no_longer_expanded.add(id(module))
    return list(dict.fromkeys(bad))
