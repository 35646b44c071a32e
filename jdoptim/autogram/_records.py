r"""What a forward hook remembers about one call of a hooked module, and where it keeps it.

A hooked module's forward hook builds a :class:`CallRecord` (the module, its positional and
keyword arguments, and the shapes of its tensor outputs) and stores it in the ``metadata`` dict of
each tensor output's ``grad_fn`` node. The record therefore lives exactly as long as the autograd
graph of that forward pass: nothing is kept on the engine, nothing outlives the graph, and a plain
``backward()`` never looks at it. The engine finds the records of one step by walking the graph of
the losses (see :mod:`jdoptim.autogram._graph`).

The record never references its own outputs (that would make a cycle through the C++ node); the
engine rebuilds each output's :class:`~torch.autograd.graph.GradientEdge` from the node it meets.

Random draws. A module that the generic rule re-runs gets a forward *pre*-hook as well
(:func:`make_pre_hook`): it snapshots the random number generators (CPU, and each initialised
CUDA device's) before the call. If the call drew random numbers (a generator's state moved), the
record keeps the snapshot, and the re-run restores it first, so that it draws the same dropout
masks as the recorded call (:class:`RandomState`).

State changed in the forward. The same pre-hook notes the version counters of the module's
buffers; a call that changed one in place (spectral normalisation's power-iteration vectors, a
running statistic read back in the forward) is marked (:attr:`CallRecord.mutated`), because a
re-run would read the changed values rather than the recorded call's: the generic rule refuses to
re-run it, and the engine takes that module's rows straight from autograd. Batch-norm running
statistics in training mode are not counted (the forward normalises with the batch's own).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_flatten

from ..introspection import iter_tensors
from ._shared import SharedCalls, expand_along, expand_inputs, is_replaying, is_shared


class Tapped(NamedTuple):
    """A tensor output of a call: its index among the output pytree's leaves, shape, dtype,
    device, and its ``output_nr`` in its ``grad_fn`` node."""

    leaf_index: int
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    output_nr: int


_TOP_SAVED_TENSORS_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def saved_tensors_packed() -> bool:
    """Whether saved-tensor hooks pack what autograd saves now (``torch.utils.checkpoint``'s
    non-reentrant form, ``torch.autograd.graph.save_on_cpu``): a saved tensor read later then
    runs the hook's unpack, a checkpointed region's recomputation. True where torch does not
    say (a private query, absent from some versions): the rules then recompute instead."""
    if _TOP_SAVED_TENSORS_HOOKS is None:
        return True
    try:
        return _TOP_SAVED_TENSORS_HOOKS(True) is not None
    except (RuntimeError, TypeError):  # (another signature in another version: say yes)
        return True


@dataclass(eq=False)
class CallRecord:
    """One call of a hooked module.

    Attributes:
        module: the module that was called.
        args, kwargs: its arguments, as given (they carry the graph of the inputs).
        tapped: the tensor outputs computed in the call (those with a ``grad_fn`` that is not
            an input's).
    """

    module: nn.Module
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tapped: list[Tapped]
    #: the generators' states before the call, when the call drew random numbers, else ``None``
    rng: RandomState | None = None
    #: ``(device_type, dtype)`` of the autocast region the call ran in (re-run modules only)
    autocast: tuple[str, torch.dtype] | None = None
    #: per-sample mode: a call shared by the samples that the hook can expand (see :mod:`._shared`)
    shareable: bool = False
    #: the hook returned the output expanded along the batch (the inputs here are expanded too)
    expanded: bool = False
    #: for an expanded call: the call's own ``(args, kwargs)``, output shape and the samples'
    #: dimension of the expanded output (the generic rule re-runs the call as it was made)
    unexpanded: tuple[tuple, dict, torch.Size, int] | None = None
    #: the module's buffers the call changed in place (re-run modules only; see the module docs)
    mutated: tuple[str, ...] = ()
    #: for an expanded call: whether every tensor argument here is expanded too (else only the
    #: generic rule, which re-runs the call as it was made, takes it)
    inputs_expanded: bool = True
    #: for a call read at the additions that give its output to the samples (see
    #: :func:`._shared.tap_additions`): per tapped addition, the shape operations from the
    #: call's output to the added operand, and that operand's shape
    paths: tuple[tuple[tuple[Callable[[Tensor], Tensor], ...], torch.Size], ...] = ()
    #: the hooked calls made inside this one (re-run modules only), as peft's DoRA calls the
    #: LoRA layers it is handed inside its magnitude module's call: the scan of the graph finds
    #: them inside this call's part of the graph (:func:`._graph.scan_graph`)
    nested: tuple[CallRecord, ...] = ()
    #: the call of a split parent (:func:`._selection.is_split_parent`): the scan of the graph
    #: takes it only when a step falls back to re-running it whole (:func:`._graph.scan_graph`)
    split: bool = False
    #: what the call's rule read from its output's autograd node before the step's backward pass
    #: freed the node's saved tensors (:meth:`~.rules.LayerRule.read_graph`), else ``None``
    graph_read: Any = None
    #: saved-tensor hooks packed what autograd saved during the call (activation checkpointing,
    #: CPU offload): reading it would run their unpack (a recomputation), so no rule reads it
    #: (asked when the record is made, in the call's forward hook)
    saved_packed: bool = field(default_factory=saved_tensors_packed)
    #: taken at its output's base (:func:`._graph.scan_graph`): the backward gives the base's
    #: gradient, which the step reads in the tapped output's shape
    from_base: bool = False

    @property
    def sole_input(self) -> Tensor | None:
        """The input of a call on one positional tensor and no keywords (a layer's usual call)."""
        return sole_tensor(self.args, self.kwargs)

    def input_tensors(self) -> list[Tensor]:
        sole = self.sole_input
        if sole is not None:
            return [sole]  # the common case, without the recursive walk
        return list(iter_tensors((self.args, self.kwargs)))


@dataclass(eq=False)
class RandomState:
    """The default generators' states: the CPU's and each initialised CUDA device's."""

    cpu: Tensor
    cuda: list[Tensor]

    @classmethod
    def capture(cls) -> RandomState:
        cuda = []
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            cuda = [torch.cuda.get_rng_state(i) for i in range(torch.cuda.device_count())]
        return cls(torch.get_rng_state(), cuda)

    def same_as(self, other: RandomState) -> bool:
        return torch.equal(self.cpu, other.cpu) and all(
            torch.equal(a, b) for a, b in zip(self.cuda, other.cuda)
        )

    def devices(self) -> list[int]:
        return list(range(len(self.cuda)))

    def restore(self) -> None:
        """Set the generators to this state (call inside ``torch.random.fork_rng``)."""
        torch.set_rng_state(self.cpu)
        for index, state in enumerate(self.cuda):
            torch.cuda.set_rng_state(state, index)


def node_metadata(node: Node) -> dict[Any, Any]:
    """The ``metadata`` dict of an autograd node, where the hooks keep their records."""
    # torch's Node stub declares `metadata` a method; at run time it is a dict attribute.
    return node.metadata  # type: ignore[return-value]


@dataclass(eq=False)
class BeforeCall:
    """What a re-run module's pre-hook notes before its call: the generators' states and the
    version counter of each of its buffers that the forward may read; and, filled during the
    call, the records of the hooked calls made inside it (modules handed to it as arguments, as
    peft's DoRA hands its LoRA layers to its magnitude module)."""

    rng: RandomState
    versions: list[tuple[str, Tensor, int]]
    inner: list[CallRecord] = field(default_factory=list)


class PendingCalls(dict[int, list[BeforeCall]]):
    """The re-run modules' calls in progress: what each pre-hook noted, by module (a stack per
    module, for a module called inside its own call), and all of them in the order they began
    (:attr:`open`)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[BeforeCall] = []


def _watched_buffers(module: nn.Module) -> list[tuple[str, Tensor, int]]:
    """``(name, buffer, version)`` of the module's buffers, less the running statistics of batch
    norms in training mode (updated by every forward, read by none)."""
    found = []
    for prefix, sub in module.named_modules():
        if isinstance(sub, _BatchNorm) and sub.training:
            continue
        for name, buffer in sub.named_buffers(recurse=False):
            found.append((f"{prefix}.{name}" if prefix else name, buffer, buffer._version))
    return found


def make_pre_hook(
    pending: PendingCalls,
) -> Callable[[nn.Module, tuple, dict], None]:
    """The forward pre-hook of a module the generic rule re-runs: pushes what it notes before
    the call on ``pending[id(module)]`` (the forward hook pops it)."""

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if torch.is_grad_enabled() and not is_replaying():
            before = BeforeCall(RandomState.capture(), _watched_buffers(module))
            pending.setdefault(id(module), []).append(before)
            pending.open.append(before)

    return pre_hook


def autocast_now() -> tuple[str, torch.dtype] | None:
    """The enabled autocast region, if any, as ``(device_type, dtype)``."""
    for device in ("cpu", "cuda"):
        if torch.is_autocast_enabled(device):
            return device, torch.get_autocast_dtype(device)
    return None


def _drawn(
    pending: PendingCalls | None, module: nn.Module
) -> tuple[RandomState | None, tuple[str, ...], tuple[CallRecord, ...]]:
    """The generators' state before this call if the call drew random numbers (else ``None``),
    the buffers the call changed in place, and the records of the calls made inside it."""
    if pending is None:
        return None, (), ()
    stack = pending.get(id(module))
    if not stack:
        return None, (), ()
    before = stack.pop()
    pending.open.remove(before)  # (the pre-hook pushes it on both)
    mutated = tuple(name for name, buffer, version in before.versions if buffer._version != version)
    rng = None if before.rng.same_as(RandomState.capture()) else before.rng
    return rng, mutated, tuple(before.inner)


def _inside(pending: PendingCalls | None, record: CallRecord) -> None:
    """Note ``record`` in every re-run call in progress (it was made inside them)."""
    if pending is not None:
        for before in pending.open:
            before.inner.append(record)


def sole_tensor(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """``args[0]`` when the call is ``f(tensor)``: one positional tensor and no keywords."""
    if not kwargs and len(args) == 1 and isinstance(args[0], Tensor):
        return args[0]
    return None


def make_hook(
    key: str,
    pending: PendingCalls | None = None,
    shared: SharedCalls | None = None,
    split: frozenset[int] = frozenset(),
) -> Callable[[nn.Module, tuple, dict, Any], Any]:
    """The forward hook (``with_kwargs=True``) that records calls under ``metadata[key]``;
    ``pending``: the pre-hooks' stack of generator states (see the module docs); ``shared``, in
    per-sample mode, what the hooks know of sample-shared calls (:mod:`._shared`): the hook
    returns such a call's output expanded along the batch once its module is expandable;
    ``split``: the split parents (ids: :func:`._selection.is_split_parent`). It holds no
    reference to the engine, so that a dropped engine can be collected (its finaliser then
    removes the hooks). Outside gradient mode, and in a rule's re-run of a call
    (:func:`._shared.replaying`), it returns at once."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not torch.is_grad_enabled() or is_replaying():  # (a rule's re-run records nothing)
            return None
        replayed = pending is not None and id(module) in pending  # a module the rules re-run
        quiet = not replayed and (pending is None or not pending.open)  # (the common case)
        parent = replayed and id(module) in split  # a split parent's call
        rng, mutated, inner = (None, (), ()) if quiet else _drawn(pending, module)
        amp = autocast_now() if replayed else None
        if _recorded_as_expanded(key, module, output, (rng, amp, mutated), pending):
            return None
        if shared is not None and output_is_shared(shared, module, args, kwargs, output):
            state = (rng, amp, mutated)
            return _record_shared(key, shared, module, args, kwargs, output, state, pending)
        sole = sole_tensor(args, kwargs)
        if isinstance(output, Tensor) and sole is not None:  # a layer on one tensor: no pytrees
            node = output.grad_fn
            if node is None or node is sole.grad_fn:
                return
            call = CallRecord(module, args, {}, [], rng, amp, mutated=mutated, nested=inner)
            call.split = parent
            _record_layer_output(key, call, output, sole)
            if not quiet:
                _inside(pending, call)
            return None
        leaves = [output] if isinstance(output, Tensor) else tree_flatten(output)[0]
        record: CallRecord | None = None
        input_nodes: set | None = None
        for index, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor) or leaf.grad_fn is None:
                continue
            if input_nodes is None:
                input_nodes = {t.grad_fn for t in iter_tensors((args, kwargs))}
            node = leaf.grad_fn
            if node in input_nodes:  # an input handed back unchanged: not computed here
                continue
            if record is None:
                record = CallRecord(
                    module, args, kwargs, [], rng, amp, mutated=mutated, nested=inner, split=parent
                )
                _inside(pending, record)
            record.tapped.append(Tapped(index, leaf.shape, leaf.dtype, leaf.device, leaf.output_nr))
            node_metadata(node).setdefault(key, []).append((record, len(record.tapped) - 1))
        return None

    return hook


def _record_layer_output(key: str, call: CallRecord, output: Tensor, sole: Tensor) -> None:
    """Records the call of a layer on one tensor at its output's node (and, for an output that
    is a view of a tensor computed in the call, at that base's node too: :func:`_note_base`)."""
    call.tapped.append(Tapped(0, output.shape, output.dtype, output.device, output.output_nr))
    node_metadata(output.grad_fn).setdefault(key, []).append((call, 0))  # type: ignore[arg-type]
    if output._is_view():
        _note_base(key, call, output, sole)


def base_key(key: str) -> str:
    """The metadata key under which a call whose output is a view is noted at its base's node
    (:func:`_note_base`)."""
    return key + ":base"


def _note_base(key: str, call: CallRecord, output: Tensor, sole: Tensor) -> None:
    """Notes ``call``, whose output is a view of a tensor computed in the call (a Linear on a
    3-D input returns ``addmm``'s ``[b·s, o]`` result viewed as ``[b, s, o]``), at that base's
    node too, with the base as its output.

    An in-place operation on the output afterwards (``ReLU(inplace=True)``, ``out += x``)
    rebases the view: autograd replaces the output's node, where the call is recorded, by a copy
    into the base, and the call would be lost to the graph walk (its parameters then took one
    backward row per loss). The walk reads the call at the base's node instead when it meets
    that node (:func:`._graph.scan_graph`), which only happens when the output's own node does
    not hide it: the base's gradient is then the call's whole output gradient. When the output
    is the whole base, viewed contiguously, the call keeps its output's shape there (the base's
    gradient is read in it): ``[s·b, o]`` rows of a sequence-first ``[s, b, d]`` input are not
    sample-major, ``[s, b, o]`` holds the samples along dimension 1."""
    base = output._base
    node = None if base is None else base.grad_fn
    if base is None or node is None or node is sole.grad_fn or base.dim() == 0:
        return
    whole = (
        output.numel() == base.numel()
        and output.storage_offset() == base.storage_offset()
        and output.is_contiguous()
        and base.is_contiguous()
    )
    shape = output.shape if whole else base.shape
    tapped = Tapped(0, shape, base.dtype, base.device, base.output_nr)
    node_metadata(node).setdefault(base_key(key), []).append((call, tapped))


def output_is_shared(
    shared: SharedCalls, module: nn.Module, args: tuple, kwargs: dict, output: Any
) -> bool:
    """The call is sample-shared in a forward of ``b > 1`` samples (see :mod:`._shared`): its
    module is expandable along a new leading dimension, or its output has size 1 along the
    batch dimension (and is not one of its inputs handed back)."""
    # (the test that fails for nearly every call first: this runs in every hooked call)
    if not shared.expandable.get(id(module)) and not is_shared(output, shared.batch_dim):
        return False
    b = shared.batch_size()
    if b is None or b <= 1 or not isinstance(output, Tensor) or output.grad_fn is None:
        return False
    if is_replaying():
        return False
    inputs = list(iter_tensors((args, kwargs)))
    if inputs and _moved_activations(inputs[0], output, shared.batch_dim, b):
        return False
    return all(t.grad_fn is not output.grad_fn for t in inputs)


def _moved_activations(x: Tensor, output: Tensor, batch_dim: int, b: int) -> bool:
    """Whether a call whose output has size 1 along ``batch_dim`` was made on activations
    holding the ``b`` samples along another dimension, as its output does: Longformer's global
    query projection of ``[g, b, d]`` sequence-first states with one global token (``g = 1``).
    Such a call indexes the samples (:func:`._sample_dims.moved_sample_dim`); a shared call
    (a position embedding) takes indices or nothing, not activations computed in the graph."""
    if x.grad_fn is None or not x.is_floating_point():
        return False
    dims = range(min(x.dim(), output.dim()))
    return any(d != batch_dim and x.shape[d] == b == output.shape[d] for d in dims)


def _record_shared(
    key: str,
    shared: SharedCalls,
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    output: Tensor,
    state: tuple,
    pending: PendingCalls | None = None,
) -> Tensor | None:
    """Records a sample-shared call: as it is (for :func:`._shared.learn`) or, for an
    expandable module, with output and inputs expanded to the forward's ``b`` samples,
    returning the expanded output (which replaces the call's)."""
    rng, amp, mutated = state
    new = shared.expandable.get(id(module))
    expand = new is not None
    shareable = is_shared(output, shared.batch_dim)
    unexpanded = None
    complete = True
    if new is not None:
        b = shared.batch_size()
        assert b is not None
        unexpanded = (args, kwargs, output.shape, shared.batch_dim)
        args, kwargs, complete = expand_inputs(args, kwargs, shared.batch_dim, b, new)
        output = expand_along(output, shared.batch_dim, b, new)
    tapped = Tapped(0, output.shape, output.dtype, output.device, output.output_nr)
    call = CallRecord(
        module, args, kwargs, [tapped], rng, amp, shareable, expand, unexpanded, mutated, complete
    )
    node = output.grad_fn
    assert node is not None  # `output_is_shared` checked it; an expanded output has one too
    node_metadata(node).setdefault(key, []).append((call, 0))
    _inside(pending, call)
    if not expand:
        return None
    assert unexpanded is not None
    setattr(output, _EXPANSION, _Expansion(id(module), args, kwargs, unexpanded, complete))
    return output


#: the attribute that marks an output expanded by a hook (see :class:`_Expansion`)
_EXPANSION = "_jdoptim_expansion"


class _Expansion(NamedTuple):
    """How a hook expanded a sample-shared call's output (set on the expanded output): the
    module's id, the call's inputs as expanded, the call as made, and whether every input was
    expanded. The hooks of another engine on the same module, which run after the expanding one
    and receive the expanded output in place of the call's, record the call from it, so that
    their record's inputs match the output they tap."""

    module_id: int
    args: tuple
    kwargs: dict
    unexpanded: tuple[tuple, dict, torch.Size, int]
    complete: bool


def _recorded_as_expanded(
    key: str, module: nn.Module, output: Any, state: tuple, pending: PendingCalls | None
) -> bool:
    """Whether another engine's hook expanded this call's output along the batch
    (:class:`_Expansion`); if so, records the call as that hook did: expanded inputs, the
    expanded output."""
    expansion = getattr(output, _EXPANSION, None)
    if expansion is None or expansion.module_id != id(module):
        return False
    rng, amp, mutated = state
    tapped = Tapped(0, output.shape, output.dtype, output.device, output.output_nr)
    call = CallRecord(
        module,
        expansion.args,
        expansion.kwargs,
        [tapped],
        rng,
        amp,
        shareable=True,
        expanded=True,
        unexpanded=expansion.unexpanded,
        mutated=mutated,
        inputs_expanded=expansion.complete,
    )
    node = output.grad_fn
    assert node is not None  # (an expanded output's node: the expansion's)
    node_metadata(node).setdefault(key, []).append((call, 0))
    _inside(pending, call)
    return True
