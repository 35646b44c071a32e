r"""The low-memory step: each call's Gramian term taken during the backward pass, then a second
backward pass for the update.

The ordinary step (:class:`~._step.GramianStep`) keeps every hooked call's output gradient
``D`` (``T`` rows of it) from its one backward pass until the weights are known, and then gives
the update from the same ``D`` with no second backward pass. At the end of that backward it
holds about the activations twice over (``T + 1`` times with ``T`` rows). This step holds
none of them:

1. **One backward pass to the lowest outputs.** The backward asks autograd only for the
   outputs below which no other hooked output (nor a parameter whose rows come from autograd)
   lies; every other call's output node runs anyway on the way down, and a pre-hook on it
   receives the output gradient as autograd accumulated it (the same ``D`` the ordinary step
   reads). ``T`` rows run as one ``torch.func.vmap`` of ``torch.autograd.grad``; the pre-hook
   hands the rows' real tensors to the call's work outside that vmap level (:func:`_unbatched`),
   as a custom function's vmap rule is run.
2. **The call's work, at once.** As soon as a call's outputs have all had their gradients, its
   rule gives its Gramian term (parameters used by this call alone) or its rows (parameters
   used by several calls, summed over the calls and squared at the end, so that the cross
   terms are there); the gradients are then let go, and the backward frees them as it moves
   on. The sum is the ordinary step's Gramian term for term.
3. **The update by a second backward pass** of ``Σᵢ wᵢ ℓᵢ``: autograd's own gradient of the
   weighted losses, exact by construction (the first pass kept the graph for it). The specific
   parameters' ``Σᵢ ∇ℓᵢ`` come from the first pass (they are captured there, ``T`` rows of
   each).

Memory: the activations, the rows of the backward pass's frontier (``T`` times an ordinary
backward's) and the lowest outputs' gradients, instead of every output's; time: one more
backward pass (about a plain step's backward). The engine's check of a new graph structure
(:mod:`._certify`) runs on this step too: made with ``probe=v``, each call's rule also gives
its ``Jᵀv`` during the backward (:class:`_Probing`, parameter-sized sums), which the check
compares with autograd's ``∂(vᵀℓ)/∂θ``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ..linalg.torch_errors import OutOfMemoryError
from ..linalg.vmap_fallback import VmapState, fallback_notice_silenced
from ._certify import ONE_FROM_ANOTHER, Probe, computes_one_output_from_another
from ._held_rows import held_rows_budget, rows_bytes, summed_rows
from ._records import CallRecord
from ._step import GramianStep, RuleParameters, StepPlan
from .rules import LayerRule
from .rules._contraction import fewest_entries

__all__ = ["StreamingStep"]

#: what a pre-hook hands over: the gradients of its node's tapped outputs, and per gradient the
#: dimension that holds the rows (``None``: the same for every row, or no rows)
_Sink = Callable[[tuple[Tensor | None, ...], tuple[int | None, ...] | None], None]


class _Unbatched(torch.autograd.Function):
    """The public way out of ``torch.func.vmap``: its ``vmap`` rule gets the rows' real tensors
    (with the dimension that holds the rows) and hands them to a sink; outside vmap it hands
    them over as they are. Its output is a dummy scalar."""

    @staticmethod
    def forward(sink: _Sink, *grads: Tensor | None) -> Tensor:
        sink(grads, None)
        return torch.zeros(())

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        pass

    @staticmethod
    def vmap(info: Any, in_dims: tuple, sink: _Sink, *grads: Tensor | None) -> tuple[Tensor, None]:
        sink(grads, tuple(in_dims[1:]))
        return torch.zeros(()), None


def _unbatched(sink: _Sink, grads: tuple[Tensor | None, ...]) -> None:
    """``sink`` called on the real tensors behind ``grads``, batched by the backward's
    ``torch.func.vmap``, outside that vmap level (rules may run their own ``torch.func``
    transforms and autograd).

    The fast way unwraps them with functorch's own primitives (``get_unwrapped``,
    ``maybe_get_bdim``) and pops the vmap level around the call, as a custom function's vmap
    rule is run: about 0.4 ms per hooked output less than :class:`_Unbatched`, the public way,
    taken where those primitives are missing, where the gradients are not batched at the
    current level alone (a step run inside another transform), and off the CPU (a device's
    backward runs in autograd's worker threads; the public way is the one made for them)."""
    functorch = torch._C._functorch
    on_cpu = all(g is None or g.device.type == "cpu" for g in grads)
    pop = getattr(functorch, "pop_dynamic_layer_stack", None) if on_cpu else None
    level = functorch.maybe_current_level() if pop is not None else None
    dims: list[int | None] = []
    plain: list[Tensor | None] = []
    for grad in grads:
        if grad is None or not functorch.is_batchedtensor(grad):
            dims.append(None)
            plain.append(grad)
        elif functorch.maybe_get_level(grad) == level:
            dims.append(functorch.maybe_get_bdim(grad))
            plain.append(functorch.get_unwrapped(grad))
        else:
            level = None
    if pop is None or level is None:
        _Unbatched.apply(sink, *grads)
        return
    saved = pop()
    try:
        sink(tuple(plain), tuple(dims))
    finally:
        functorch.push_dynamic_layer_stack(saved)


def _with_targets_below(roots: list[Node], targets: set[Node], of: set[Node]) -> set[Node]:
    """The nodes of ``of`` below which (strictly) a node of ``targets`` lies; one walk of the
    graph, each node's answer remembered."""
    reaches: dict[Node, bool] = {}
    stack: list[tuple[Node, bool]] = [(root, False) for root in roots]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            reaches[node] = node in targets or any(
                reaches[child] for child, _ in node.next_functions if child is not None
            )
        elif node not in reaches:
            stack.append((node, True))
            stack.extend(
                (child, False)
                for child, _ in node.next_functions
                if child is not None and child not in reaches
            )
    return {
        node
        for node in of
        if any(reaches.get(child, False) for child, _ in node.next_functions if child is not None)
    }


#: one tapped output of a call at a node: the call, its parameters of this step, the output's
#: index among the call's tapped outputs, and its output number at the node
_Entry = tuple[CallRecord, list[Tensor], int, int]


class _Inbox:
    """The calls' output gradients as the backward delivers them: when a call has all of its
    reached outputs' gradients, ``finish(record, params, grads)`` runs and the inbox lets them
    go. Batched gradients are put rows first (``T`` rows; one the same for every row is
    expanded)."""

    def __init__(
        self,
        plan: StepPlan,
        wanted: list[tuple[CallRecord, list[Tensor]]],
        rows: int | None,
        finish: Callable[[CallRecord, list[Tensor], list[Tensor | None]], None],
    ) -> None:
        self.waiting: dict[int, list[Tensor | None]] = {
            id(r): [None] * len(r.tapped) for r, _ in wanted
        }
        self.missing = {id(r): sum(e is not None for e in plan.scan.calls[r]) for r, _ in wanted}
        self.rows = rows
        self.finish = finish

    def receive(self, entries: list[_Entry], grads: tuple, dims: tuple | None) -> None:
        for (record, params, index, _), grad, dim in zip(
            entries, grads, dims or (None,) * len(grads)
        ):
            if grad is not None and self.rows is not None:
                if dim is None:
                    grad = grad.unsqueeze(0).expand(self.rows, *grad.shape)
                else:
                    grad = grad.movedim(dim, 0)
            self.waiting[id(record)][index] = grad
            self.missing[id(record)] -= 1
            if self.missing[id(record)] == 0:
                self.finish(record, params, self.waiting.pop(id(record)))


def _prehook(entries: list[_Entry], inbox: _Inbox) -> Callable[[tuple], None]:
    """The pre-hook of a node that runs in the backward: hands the gradients of its tapped
    outputs to ``inbox`` (out of the backward's vmap level when the rows are batched)."""

    def sink(grads: tuple, dims: tuple | None) -> None:
        inbox.receive(entries, grads, dims)

    def prehook(grad_outputs: tuple) -> None:
        grads = tuple(grad_outputs[nr] for *_, nr in entries)
        if inbox.rows is not None:
            _unbatched(sink, grads)
        else:
            sink(grads, None)

    return prehook


class _Probing:
    """The check's data, gathered call by call during a probed step's backward: each rule's
    ``Jᵀv`` (``weights``: ``v`` as the rules' ``[b, T]``), who uses each parameter, the dtypes,
    and the modules that fail outright."""

    def __init__(self, weights: Tensor) -> None:
        self.weights = weights
        self.found: dict[int, Tensor] = {}
        self.users: dict[int, list[nn.Module]] = {}
        self.dtypes: set[torch.dtype] = set()
        self.failed: dict[nn.Module, str] = {}
        self.raised = False

    def _add(self, p: Tensor, grad: Tensor) -> None:
        grad = grad if grad.shape == p.shape else grad.reshape(p.shape)
        self.found[id(p)] = grad if id(p) not in self.found else self.found[id(p)] + grad

    def take(self, parts: RuleParameters, edges: list, take_terms: Callable[[], None]) -> None:
        """A call's terms (``take_terms``) and its ``Jᵀv``; a rule that raises (a re-run that
        failed) fails its module instead of the step."""
        module = parts.rule.call.module
        params = [*parts.shared, *parts.specific]
        for p in params:
            self.users.setdefault(id(p), []).append(module)
        self.dtypes.update(t.dtype for t in parts.rule.call.record.tapped)
        if computes_one_output_from_another(parts.rule, edges):
            self.failed[module] = ONE_FROM_ANOTHER
        try:
            take_terms()
            for p, grad in zip(params, parts.rule.weighted(params, self.weights)):
                self._add(p, grad)
        except RuntimeError as err:
            if isinstance(err, OutOfMemoryError):
                raise
            self.raised = True
            self.failed.setdefault(module, str(err).splitlines()[0])

    def probe(self, explicit: list[Tensor], rows: list[Tensor], params: list[Tensor]) -> Probe:
        """The probe, with the explicit parameters' ``Jᵀv`` from their autograd rows."""
        if self.raised:
            return Probe([], self.users, self.dtypes, self.failed)
        flat = self.weights.reshape(-1)
        for p, p_rows in zip(explicit, rows):
            self._add(p, torch.tensordot(flat.to(p_rows.dtype), p_rows, dims=1))
        grads = [self.found.get(id(p), torch.zeros_like(p)) for p in params]
        return Probe(grads, self.users, self.dtypes, self.failed)


def _by_node(
    plan: StepPlan, wanted: list[tuple[CallRecord, list[Tensor]]]
) -> dict[Node, list[_Entry]]:
    """The calls' reached outputs by the node they are read at."""
    by_node: dict[Node, list[_Entry]] = {}
    for r, ps in wanted:
        for index, edge in enumerate(plan.scan.calls[r]):
            if edge is not None:
                by_node.setdefault(edge.node, []).append((r, ps, index, edge.output_nr))
    return by_node


class StreamingStep(GramianStep):
    """:class:`~._step.GramianStep` that holds no output gradient; see the module docstring.

    Its :meth:`gradients` run the second backward pass (which frees the graph unless the step
    was made with ``retain_graph``): call it once, under ``torch.no_grad()`` or not.

    With ``probe=v`` (the engine's check of a new graph structure, :mod:`._certify`), each
    call's rule also gives its ``Jᵀv`` during the backward (parameter-sized sums), and
    :attr:`probe` holds what the check compares with autograd's."""

    def __init__(self, *args: Any, probe: Tensor | None = None, **kwargs: Any) -> None:
        self._probe_weights = probe
        #: the check's comparison data (with ``probe=v``), else ``None``
        self.probe: Probe | None = None
        super().__init__(*args, **kwargs)

    def _differentiate(
        self, losses: Tensor, plan: StepPlan, retain_graph: bool, state: VmapState
    ) -> None:
        self._losses = losses
        self._retain = retain_graph
        self.rule_parameters = []  # nothing held: the rules run during the backward
        self.generic_modules = set()
        self.call_edges = []
        self._alone: Tensor | None = None  # the sum of the calls' own Gramian terms
        # rows of parameters used by several calls, by id: (parameter, rows)
        self._tied: dict[int, tuple[Tensor, Tensor]] = {}
        # those whose rows would outweigh their calls' output gradients: the rules, kept
        self._kept: dict[int, tuple[Tensor, list[LayerRule]]] = {}
        batched = self.T > 1

        probing = None if self._probe_weights is None else _Probing(self.moved(self._probe_weights))

        def finish(record: CallRecord, params: list[Tensor], grads: list[Tensor | None]) -> None:
            call = self._call(record, grads, params, plan.layouts, batched)
            edges = [e for e in plan.scan.calls[record] if e is not None]
            self._take(self._rule_parameters(call, plan), edges, probing)

        wanted, shared_calls = self._calls_of(plan)
        inbox = _Inbox(plan, wanted, self.T if batched else None, finish)
        by_node = _by_node(plan, wanted)
        # autograd's rows: the explicit parameters', and the specific ones' (summed)
        explicit_ids = {id(p) for p in self.explicit}
        self._captured = self.explicit + [p for p in self.specific if id(p) not in explicit_ids]
        leaf_nodes = {get_gradient_edge(p).node for p in self._captured}
        assert losses.grad_fn is not None
        running = _with_targets_below([losses.grad_fn], set(by_node) | leaf_nodes, set(by_node))
        handles = [node.register_prehook(_prehook(by_node[node], inbox)) for node in running]
        lowest = [(node, entries) for node, entries in by_node.items() if node not in running]
        edges = {(e[3], node): GradientEdge(node, e[3]) for node, es in lowest for e in es}
        at_entries = [] if self.regions is None else [e.at for e in self.regions.entries]
        try:
            inputs: list = [*edges.values(), *self._captured, *at_entries]
            grads = self._first_backward(losses, inputs, plan.grad_outputs, batched)
        finally:
            for handle in handles:
                handle.remove()
        found = dict(zip(edges, grads))
        for node, entries in lowest:
            inbox.receive(entries, tuple(found[(e[3], node)] for e in entries), (0,) * len(entries))
        if inbox.waiting:
            names = ", ".join(self.label(r.module) for r, _ in wanted if id(r) in inbox.waiting)
            raise RuntimeError(
                f"The low-memory step missed the output gradients of {names} (a bug: report it)."
            )
        captured = len(edges) + len(self._captured)
        self._take_captured(grads[len(edges) : captured], batched)
        if self.regions is not None:
            rows = self._finish_regions(grads[captured:], plan, shared_calls, state, finish)
            if self.region_params:
                self._take(self._region_rule(rows, plan.covered), [], probing)
        if probing is not None:
            self.probe = probing.probe(
                self.explicit, self.explicit_rows, self.shared + self.specific
            )

    def _take(self, parts: RuleParameters, edges: list, probing: _Probing | None) -> None:
        """A call's terms and rows (:meth:`_take_terms`), and with the check, its ``Jᵀv``."""
        with torch.no_grad(), fewest_entries():  # the activations are alive meanwhile
            if probing is None:
                self._take_terms(parts)
            else:
                probing.take(parts, edges, lambda: self._take_terms(parts))

    def _calls_of(
        self, plan: StepPlan
    ) -> tuple[list[tuple[CallRecord, list[Tensor]]], list[tuple[CallRecord, list[Tensor]]]]:
        """The calls with parameters of this step: those whose output gradients the backward
        delivers, and those of sample-shared regions (finished after it, from the regions' own
        backward)."""
        inside = set() if self.regions is None else self.regions.record_ids
        wanted = [(r, ps) for r, ps in zip(plan.records, plan.call_params) if ps]
        return [c for c in wanted if id(c[0]) not in inside], [
            c for c in wanted if id(c[0]) in inside
        ]

    def _finish_regions(
        self,
        at_entries: list[Tensor | None],
        plan: StepPlan,
        calls: list[tuple[CallRecord, list[Tensor]]],
        state: VmapState,
        finish: Callable[[CallRecord, list[Tensor], list[Tensor | None]], None],
    ) -> list[Tensor]:
        """The sample-shared regions' calls (``calls``, with their parameters), finished from
        the regions' own backward (:meth:`~._step.GramianStep._region_gradients`; the graph is
        kept for the update's backward pass); the rows of their parameters read directly."""
        per_record: dict[int, list[Tensor | None]] = {
            id(r): [None] * len(r.tapped) for r, _ in calls
        }
        rows, _ = self._region_gradients(at_entries, per_record, plan, True, state)
        for record, params in calls:
            finish(record, params, per_record[id(record)])
        return rows

    def _first_backward(
        self, losses: Tensor, inputs: list, grad_outputs: Tensor, batched: bool
    ) -> list[Tensor | None]:
        """One backward pass (``T`` rows: one ``torch.func.vmap`` of it) that keeps the graph;
        unused inputs give ``None``. Batched results have their rows first."""
        if not batched:
            return list(
                torch.autograd.grad(
                    losses, inputs, grad_outputs, retain_graph=True, allow_unused=True
                )
            )
        unused: list[bool] = []

        def rows(row: Tensor) -> tuple[Tensor, ...]:
            grads = torch.autograd.grad(losses, inputs, row, retain_graph=True, allow_unused=True)
            unused[:] = [g is None for g in grads]
            return tuple(g for g in grads if g is not None)

        # randomness="same": a draw during the backward (a checkpointed segment's dropout,
        # recomputed under its saved generator state) is one draw for every row, as in the
        # forward it recomputes
        with fallback_notice_silenced():
            found = iter(torch.func.vmap(rows, randomness="same")(grad_outputs))
        return [None if gone else next(found) for gone in unused]

    def _take_terms(self, parts: RuleParameters) -> None:
        """A call's Gramian term (its parameters used by it alone) and rows (those used by
        several calls), then nothing of it is kept."""
        if parts.alone:
            term = parts.rule.gramian(parts.alone)
            self._alone = term if self._alone is None else self._alone + term
        summed = [p for p in parts.several if not self._keeps_rule(p, parts.rule)]
        for p in parts.several:
            if id(p) in self._kept:
                self._kept[id(p)][1].append(parts.rule)
        for p, rows in zip(summed, parts.rule.jacobians(summed) if summed else []):
            held = self._tied.get(id(p))
            self._tied[id(p)] = (p, rows.clone() if held is None else held[1].add_(rows))

    def _keeps_rule(self, param: Tensor, rule: LayerRule) -> bool:
        """Whether a tied parameter's calls are kept, with their output gradients, until the
        end of the backward (its Gramian then summed over slices of it, :func:`._held_rows.
        tied_gramian`) rather than its rows summed as they come: decided at its first call,
        where its ``b T`` rows would take more memory than that call's output gradients (a
        vocabulary-sized head tied to the token embedding: ``e/S`` times more)."""
        if id(param) in self._kept:
            return True
        if id(param) in self._tied:
            return False
        grads = sum(g.numel() * g.element_size() for g in rule.call.grads if g is not None)
        if rows_bytes(self.b * self.T, param) <= grads:
            return False
        self._kept[id(param)] = (param, [])
        return True

    def _take_captured(self, grads: list[Tensor | None], batched: bool) -> None:
        """The explicit parameters' rows ``[T, *p.shape]`` and the specific ones' sums."""
        rows = self._autograd_rows(self._captured, grads, batched)
        self.explicit_rows = rows[: len(self.explicit)]  # (the captured start with them)
        by_param = dict(zip(map(id, self._captured), rows))
        self._specific_sums = [by_param[id(p)].sum(0) for p in self.specific]

    def _tied_rows(self) -> list[tuple[Tensor, Tensor]]:
        kept = [(p, summed_rows(p, rules)) for p, rules in self._kept.values()]
        return [*self._tied.values(), *kept]

    def _loose_and_tied(
        self,
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, list[LayerRule]]]]:
        """The tied rows summed during the backward pass, and the tied parameters whose calls'
        rules were kept (:meth:`_keeps_rule`)."""
        return [*self._tied.values(), *self._explicit_shared_rows()], list(self._kept.values())

    def _alone_terms(self, formed: set[int]) -> Iterable[Tensor]:
        return [] if self._alone is None else [self._alone]

    def _held_rows_budget(self) -> int:
        """Nothing is held: the update is a second backward pass, which needs no rows."""
        return 0

    def _sliced_rows_budget(self) -> int:
        """The kept rules' output gradients (what the step holds anyway), at least
        :data:`~._held_rows.HELD_ROWS_FLOOR_BYTES`: the bytes of a tied parameter's rows
        formed at once."""
        grads = [g for _, rules in self._kept.values() for r in rules for g in r.call.grads]
        return held_rows_budget(sum(g.numel() * g.element_size() for g in grads if g is not None))

    def gramian(self) -> Tensor:
        """As :meth:`GramianStep.gramian`; then the kept tied rules go (their output gradients
        are not kept through the update's backward pass)."""
        try:
            return super().gramian()
        finally:
            self._kept = {}

    def gradients(
        self, weights: Tensor | None, weigh_specific: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """As :meth:`GramianStep.gradients`, by the second backward pass (``Σ wᵢ ℓᵢ``); the
        specific parameters' sums come from the first pass."""
        params = [*self.shared, *(self.specific if weigh_specific else [])]
        if not params:
            self.release_graph(self._losses)
            return [], list(self._specific_sums)
        assert weights is not None
        losses = self._losses
        grad_outputs = weights.reshape(losses.shape).to(losses.dtype)
        grads = torch.autograd.grad(
            losses, params, grad_outputs, retain_graph=self._retain, allow_unused=True
        )
        found = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        shared = found[: len(self.shared)]
        return shared, found[len(self.shared) :] if weigh_specific else list(self._specific_sums)

    def checked(self, losses: Tensor, retain_graph: bool) -> None:
        """The check is over: the update's backward pass keeps the graph only if the caller
        asked for it."""
        self._retain = retain_graph

    def release_graph(self, losses: Tensor) -> None:
        """Free the graph the first backward pass kept, unless the step was made with
        ``retain_graph``: one backward of zeros to the parameters."""
        params = [*self.shared, *self.specific]
        if not self._retain and params:
            torch.autograd.grad(losses, params, torch.zeros_like(losses), allow_unused=True)
