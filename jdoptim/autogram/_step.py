r"""One Gramian step: find the calls, one backward to their outputs, then Gramian and update.

1. :func:`~._graph.scan_graph` finds the recorded calls the losses reach, and the parameters
   used outside any call (*explicit* parameters).
2. One backward pass from the losses to the calls' outputs (and to the explicit parameters),
   never to the hooked modules' own parameters:

   * per-sample mode (``batch_dim``; losses ``[b, T]`` after moving ``batch_dim`` first, ``T = 1``
     for a vector): ``grad_outputs`` selects loss column ``k`` in every sample at once, so
     ``T`` rows (one ordinary backward for ``T = 1``) give ``D[k] = ∂(Σᵢ ℓ_{ik})/∂Y``, whose
     sample-``i`` slice is ``∂ℓ_{ik}/∂Y_i`` because the samples are independent;
   * task mode (no ``batch_dim``, or explicit parameters, which need one row per loss): one row
     per loss, ``b = 1``, ``T = m``.

   Several rows are one vmapped backward (``is_grads_batched``), or a loop where vmap fails.
3. Each call's rule gives its Gramian contribution (:mod:`.rules`); a parameter used in several
   calls (a module called twice, tied weights) gets its rows summed over the calls before its
   Gram matrix is taken, so the cross terms are there. ``G = Σ`` contributions.
4. Once the weights ``w`` are known, each rule gives ``Σ w_{ik} ∂ℓ_{ik}/∂p`` from the same output
   gradients: there is no second backward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from ..linalg.sparse_rows import dense
from ..linalg.vmap_fallback import VmapState, vmap_or_loop
from ._gathered import sample_major
from ._graph import GraphScan, scan_graph
from ._held_rows import HeldRows, RowsBuffer, held_rows_budget, hold_rows, summed_rows
from ._records import CallRecord
from ._regions import (
    REGION,
    RegionRows,
    Regions,
    find_regions,
    region_backward,
    to_call_gradient,
)
from ._sample_dims import (
    SourceDim,
    declared_sample_dim,
    moved_sample_dim,
    output_sample_dims,
)
from ._sample_trace import Held
from .rules import Call, GenericRule, LayerRule, make_rule, registered_rule


def _backward(
    losses: Tensor,
    inputs: list,
    grad_outputs: Tensor,
    batched: bool,
    retain_graph: bool,
    state: VmapState,
) -> list[Tensor | None]:
    if not inputs:
        return []
    if not batched:  # one row: the gradients as autograd gives them, without the row dimension
        return list(
            torch.autograd.grad(
                losses, inputs, grad_outputs, retain_graph=retain_graph, allow_unused=True
            )
        )

    def at_once(probing: bool) -> list[Tensor | None]:
        grads = torch.autograd.grad(
            losses,
            inputs,
            grad_outputs,
            retain_graph=retain_graph or probing,
            allow_unused=True,
            is_grads_batched=True,
        )
        return list(grads)

    return vmap_or_loop(
        at_once, lambda: _looped_backward(losses, inputs, grad_outputs, retain_graph), state
    )


def _looped_backward(
    losses: Tensor, inputs: list, grad_outputs: Tensor, retain_graph: bool
) -> list[Tensor | None]:
    """:func:`_backward` one row of ``grad_outputs`` at a time."""
    rows = []
    count = grad_outputs.shape[0]
    for k in range(count):
        keep = retain_graph or k < count - 1
        rows.append(
            torch.autograd.grad(
                losses, inputs, grad_outputs[k], retain_graph=keep, allow_unused=True
            )
        )
    return [
        None if all(r[i] is None for r in rows) else _stack_rows([r[i] for r in rows])
        for i in range(len(inputs))
    ]


def _stack_rows(rows: list[Tensor | None]) -> Tensor:
    like = next(r for r in rows if r is not None)
    return torch.stack([torch.zeros_like(like) if r is None else r for r in rows])


def _read_graphs(scan: GraphScan, records: list[CallRecord], call_params: list) -> None:
    """Let the rules that read their calls' autograd nodes (:attr:`LayerRule.reads_graph`) take
    what they need (into ``record.graph_read``) before the backward pass frees the nodes' saved
    tensors; not where saved-tensor hooks packed them (activation checkpointing), whose unpack
    would recompute the region."""
    for record, params in zip(records, call_params):
        if not params or record.graph_read is not None or record.saved_packed:
            continue
        rule = registered_rule(record.module)
        if rule is None or not rule.reads_graph:
            continue
        edge = scan.calls[record][0]
        if edge is not None:
            record.graph_read = rule.read_graph(record.module, edge.node)


def _parameters_of(module: torch.nn.Module) -> Iterable[Tensor]:
    """``module.parameters()`` (each once), read straight from ``_parameters`` for a module
    without children (a layer), which skips the generator machinery of ``named_parameters``."""
    if not module._modules:
        return dict.fromkeys(p for p in module._parameters.values() if p is not None)
    return dict.fromkeys(module.parameters())


def parameter_ids(module: torch.nn.Module) -> tuple[int, ...]:
    """The ids of the parameters :func:`_parameters_of` gives, in its order: what a
    :class:`StepTemplate` of a call of ``module`` depends on."""
    return tuple(map(id, _parameters_of(module)))


@dataclass(frozen=True, eq=False)
class StepTemplate:
    """What a step derives from its graph's structure alone, reused by the next steps of the
    same structure: per call (in the scan's order), its parameters that take rows from its rule
    and where its outputs index the samples; how many calls cover each parameter; the parameters
    whose rows come straight from autograd; whether the step found sample-shared regions
    (:mod:`._regions`), and the parameters read directly in them.

    The engine keys it (:meth:`~.engine.Engine.step`) by the route's signature (the calls'
    modules and output shapes in the scan's order, the step's parameters used outside calls, the
    losses' shape), the route itself, the step's shared and specific parameters, and each
    called module's parameters (:func:`parameter_ids`): everything :meth:`GramianStep.
    _sort_parameters` and :meth:`GramianStep._sample_layouts` read; it keeps one per structure
    and route (the last), so that a replaced parameter is not held alive by an older template.
    Nothing in it is mutated."""

    call_params: list[list[Tensor]]
    covered: dict[int, int]
    explicit: list[Tensor]
    layouts: list[Layout]
    regions: bool = False
    regional: list[Tensor] = field(default_factory=list)
    unindexed: frozenset[int] = frozenset()
    #: the step took split parents' calls whole (:meth:`GramianStep._scanned`)
    parents: bool = False

    @property
    def reusable(self) -> bool:
        """Whether a later step of the structure may take it: not where a call is on entries
        gathered from the samples' (:attr:`Layout.rows`), which each forward routes anew. (A
        reading that rests on index values, :attr:`Layout.by_values`, is made again by the
        step that takes the template: :meth:`GramianStep._read_by_values_again`.)"""
        return all(layout.rows is None for layout in self.layouts)


class ReadingChanged(Exception):
    """A step of a checked structure reads a call's samples otherwise than the checked step did,
    where that reading rests on index values (a scatter whose index was each entry's sample):
    raised before the backward pass, so that the engine checks the step as a new structure."""


class NotPerSample(Exception):
    """A hooked call's output does not index the samples (e.g. a position embedding
    ``wpe(arange(t))`` of shape ``[t, d]`` or ``[1, s, d]``, shared by every sample): its output
    gradient cannot be split per sample, and the engine takes this step in task mode.
    ``modules`` holds the ids of every such call's module."""

    def __init__(self, message: str, modules: list[int]) -> None:
        super().__init__(message)
        self.modules = modules


#: how many entries of its sample dimension each sample owns in a call's outputs: one number for
#: all of them, or one per output (a re-run call whose outputs fold the samples differently)
Group = int | tuple[int, ...]


def _sample_group(record: CallRecord, dims: list[int], count: int, label: str) -> Group | str:
    """How many consecutive entries of its sample dimension each sample owns in the call's
    outputs (``1``: they index the ``count`` samples; ``k``: ``k·count`` entries, the samples
    folded with another dimension, sample-major, as ``x.reshape(-1, d)`` over ``[b, s, d]``
    gives; per output, when they differ: WavLM's attention returns ``[b, s, d]`` and a
    ``[b·heads, s, s]`` position bias, which only the generic rule takes; the engine's check
    proves that reading on the structure's first step), or why the outputs cannot be split per
    sample."""
    per_output = [
        tapped.shape[dim] if len(tapped.shape) > dim else 0
        for tapped, dim in zip(record.tapped, dims)
    ]
    sizes = set(per_output)
    size = sizes.pop() if len(sizes) == 1 else 0
    if size == count:
        return 1
    folds = not isinstance(record.module, torch.nn.RNNBase)
    if size > count and size % count == 0 and folds:
        return size // count
    if not size and folds and all(s >= count and s % count == 0 for s in per_output):
        return tuple(s // count for s in per_output)
    shapes = ", ".join(str(tuple(t.shape)) for t in record.tapped)
    return (
        f"{label} returned shape {shapes}, whose dimension {dims[0]} does not hold the {count} "
        "samples (nor a multiple of them, sample-major): its output is shared by the samples "
        "(as a position embedding's is) or mixes them, so one output gradient per sample "
        "cannot be had from one backward pass."
    )


class _OutputNodes:
    """The hooked calls by the autograd nodes of their outputs (and which tapped output each
    node's output is), built on first use."""

    def __init__(self, scan: GraphScan) -> None:
        self.scan = scan
        self.by_node: dict[tuple[int, int], tuple[CallRecord, int]] | None = None

    def at(self, node: object, output_nr: int) -> tuple[CallRecord, int] | None:
        if self.by_node is None:
            self.by_node = {
                (id(edge.node), edge.output_nr): (record, index)
                for record, edges in self.scan.calls.items()
                for index, edge in enumerate(edges)
                if edge is not None
            }
        return self.by_node.get((id(node), output_nr))


def _as_layout(found: Layout | str | None) -> Layout:
    return found if isinstance(found, Layout) else Layout(None, 1)


def _held_at(record: CallRecord, index: int, layout: Layout) -> tuple[Held, tuple[int, ...]]:
    """Where the call's tapped output ``index`` holds the samples by its ``layout`` (which has
    dimensions), and that output's shape: what a trace meets at a producer's output."""
    assert layout.dims is not None
    group = layout.group if isinstance(layout.group, int) else layout.group[index]
    held = Held(layout.dims[index], group, layout.rows, layout.by_values)
    return held, tuple(record.tapped[index].shape)


#: how many producers' readings one call's reading may nest (each traces its input in turn)
_NESTED_READINGS = 8


class Layout(NamedTuple):
    """Where a call's outputs index the samples, in per-sample mode.

    Attributes:
        dims: per tapped output, its sample dimension (``None`` without ``batch_dim``).
        group: how many entries of it each sample owns (see :func:`_sample_group`).
        batch_dim: the call's own sample dimension, for a layer called on a tensor whose
            samples were moved (:func:`._sample_dims.moved_sample_dim`); ``None``: the engine's.
        rows: for a call on entries gathered from the samples' (a mixture-of-experts' expert
            on its tokens), the sample of each entry of its sample dimension; the call is
            handed to its rule laid out sample-major (:mod:`._gathered`).
    """

    dims: list[int] | None
    group: Group
    batch_dim: int | None = None
    rows: Tensor | None = None
    #: read from the values of index tensors (:attr:`._sample_trace.Held.by_values`)
    by_values: bool = False


@dataclass(frozen=True, eq=False)
class StepPlan:
    """What a step's backward pass is set up from, before it runs.

    Attributes:
        scan: the walk of the losses' graph.
        records: the calls the losses reach.
        call_params: per call, its parameters that take rows from its rule.
        covered: how many calls cover each such parameter (by id).
        layouts: per call (by id), where its outputs index the samples and how many entries
            each sample owns there (see :meth:`GramianStep._sample_layouts`).
        grad_outputs: the backward's ``grad_outputs`` (see :meth:`GramianStep._grad_outputs`).
        whole_modules: ids of modules the generic rule re-runs on the whole batch.
    """

    scan: GraphScan
    records: list[CallRecord]
    call_params: list[list[Tensor]]
    covered: dict[int, int]
    layouts: dict[int, Layout]
    grad_outputs: Tensor
    whole_modules: frozenset[int]


@dataclass(frozen=True, eq=False)
class RuleParameters:
    """A call's rule and its parameters, sorted once per step.

    Attributes:
        rule: the call's rule.
        shared: the parameters in the Gramian (they receive the weighted update).
        specific: the parameters that receive ``Σ_{i,k} ∂ℓ_{ik}/∂p``.
        alone: the shared parameters used by this call only (the rule's
            :meth:`~.rules.LayerRule.factorisation` gives their Gramian).
        several: the shared parameters used by several calls (a module called twice, tied
            weights), whose rows are summed over the calls before their Gram matrix is taken.
    """

    rule: LayerRule
    shared: list[Tensor]
    specific: list[Tensor]
    alone: list[Tensor]
    several: list[Tensor]

    @classmethod
    def of(
        cls, rule: LayerRule, params: list[Tensor], shared_ids: set[int], uses: dict[int, int]
    ) -> RuleParameters:
        shared: list[Tensor] = []
        specific: list[Tensor] = []
        alone: list[Tensor] = []
        several: list[Tensor] = []
        for p in params:  # (one pass: this runs for every call of every step)
            if id(p) not in shared_ids:
                specific.append(p)
                continue
            shared.append(p)
            (alone if uses[id(p)] == 1 else several).append(p)
        return cls(rule, shared, specific, alone, several)


class GramianStep:
    """The state of one step between the backward pass and the update; see the module docs.

    Args:
        losses: the losses, of any shape (their autograd graph is used).
        key: the engine's metadata key.
        shared: parameters whose rows enter the Gramian and receive the weighted update.
        specific: parameters that receive ``Σ_{i,k} ∂ℓ_{ik}/∂p`` (their one loss's gradient).
        batch_dim: the dimension of ``losses`` (and of the modules' tensors) indexing samples,
            or ``None``.
        retain_graph: keep the graph after the backward pass.
        assume_reached: the parameters are known to be reached by the losses (as those of a
            :class:`~jdoptim.parameter_plan.ParameterPlan` are), so one that no recorded call
            covers is differentiated directly; otherwise it is taken as unreached.
        scan: the walk of the losses' graph, when the caller has made it already.
        explicit_modules: ids of hooked modules whose parameters take their rows straight from
            autograd (one backward row per loss) instead of from their rule.
        whole_modules: ids of modules the generic rule re-runs on the whole batch (not one
            sample at a time) in per-sample mode.
        labels: how messages name each module (its path in the model), by id.
        rows_buffer: the engine's reusable matrix for the rows held from :meth:`gramian` to
            :meth:`gradients` (:mod:`._held_rows`); without it, a fresh one per step.
        template: what an earlier step of the same structure derived from it
            (:class:`StepTemplate`), instead of deriving it again; the step's own is
            :attr:`template`.
        regions: in per-sample mode, read parameters and calls shared by the samples per sample
            where the batch enters them (:mod:`._regions`) rather than taking the step with one
            backward row per loss.

    Raises :class:`NotPerSample` when, with ``batch_dim``, a hooked call's output does not index
    the samples.

    Call :meth:`gramian` and :meth:`gradients` under ``torch.no_grad()``: the layer rules use the
    recorded inputs as they are, without detaching them.
    """

    def __init__(
        self,
        losses: Tensor,
        key: str,
        shared: Sequence[Tensor],
        specific: Sequence[Tensor],
        batch_dim: int | None,
        retain_graph: bool = False,
        vmap_state: VmapState | None = None,
        assume_reached: bool = True,
        scan: GraphScan | None = None,
        explicit_modules: frozenset[int] = frozenset(),
        whole_modules: frozenset[int] = frozenset(),
        labels: dict[int, str] | None = None,
        rows_buffer: RowsBuffer | None = None,
        template: StepTemplate | None = None,
        regions: bool = True,
        by_values: frozenset[int] | None = None,
    ) -> None:
        #: the modules (ids) whose readings rested on index values when the structure was
        #: checked (:attr:`Layout.by_values`); a step that reads otherwise raises
        #: :class:`ReadingChanged` before its backward pass (``None``: not compared)
        self._expected_by_values = by_values
        if losses.grad_fn is None:
            raise ValueError(
                "The losses have no autograd graph (no grad_fn): compute them from the model's "
                "output with gradients enabled."
            )
        self.losses_shape, self.device = tuple(losses.shape), losses.device
        self.shared, self.specific = list(shared), list(specific)
        self.shared_ids = {id(p) for p in self.shared}
        self.labels = labels or {}
        self.held, self.partitioned = None, []
        self.rows_buffer = rows_buffer
        if scan is None:
            scan = scan_graph([losses.grad_fn], key)
        self._sorting = (explicit_modules, assume_reached)
        scan, template, call_params, covered = self._scanned(
            losses, key, scan, template, batch_dim, regions
        )
        records = list(scan.calls)
        if batch_dim is not None and (self.explicit or losses.dim() == 0):
            batch_dim = None  # explicit rows need one backward row per loss
        if batch_dim is not None and batch_dim >= losses.dim():
            raise ValueError(
                f"batch_dim={batch_dim} but the losses have shape {tuple(losses.shape)}."
            )
        self.batch_dim = batch_dim
        grad_outputs = self._grad_outputs(losses, batch_dim)  # (sets b and T)
        #: what this step derived from its structure, for the next steps of the same one
        if template is not None and batch_dim is not None:
            self._read_by_values_again(scan, template, batch_dim)
        self.template = template or self._template(scan, call_params, covered, batch_dim)
        layouts = dict(zip(map(id, records), self.template.layouts))
        plan = StepPlan(scan, records, call_params, covered, layouts, grad_outputs, whole_modules)
        state = vmap_state if vmap_state is not None else VmapState()
        _read_graphs(scan, records, call_params)
        self._differentiate(losses, plan, retain_graph, state)

    #: the rows :meth:`gramian` holds for :meth:`gradients` (:mod:`._held_rows`), and the
    #: engine's matrix they are held in
    held: HeldRows | None
    #: the fresh products of which :meth:`gradients`' results include disjoint views (the
    #: held rows' ``wᵀ R``): stored in ``.grad`` without a copy
    partitioned: list[Tensor]
    #: the parameters whose rows come straight from the step's backward pass
    explicit: list[Tensor]
    #: the sample-shared regions the step reads per sample (:mod:`._regions`), and the
    #: parameters read directly in them (their rows: the last of :attr:`rule_parameters`)
    regions: Regions | None
    region_params: list[Tensor]
    #: the modules (ids) of the calls whose outputs do not index the samples, when the step
    #: looked for regions (a product may read their outputs as a region's)
    unindexed: frozenset[int]
    #: the modules (ids) of the calls on entries gathered from the samples' (:attr:`Layout.rows`)
    gathered: frozenset[int] = frozenset()
    #: the modules (ids) whose readings rest on index values (:attr:`Layout.by_values`; a
    #: structure with any is never templated, so a templated step has none)
    by_values: frozenset[int] = frozenset()

    def _scanned(
        self,
        losses: Tensor,
        key: str,
        scan: GraphScan,
        template: StepTemplate | None,
        batch_dim: int | None,
        regions: bool,
    ) -> tuple[GraphScan, StepTemplate | None, list[list[Tensor]], dict[int, int]]:
        """The step's scan (with its regions' calls recorded as expanded), template, calls'
        parameters and coverage. Split parents (:func:`._selection.is_split_parent`) are taken
        whole (the generic rule re-runs each, for all its parameters; the calls of its children
        are its own business) in task mode, where one re-run with ``T`` vector-Jacobian
        products was measured cheaper than its children's rules (a ViT with its own tokens, 8
        tasks: 3.2x a plain step against 4.2x), and in a per-sample step whose split parents'
        direct parameters no region reads, rather than one backward row per loss."""
        self.parents = False
        if batch_dim is None or (template is not None and template.parents):
            scan = self._with_parents(losses, key, scan)
        if template is not None and len(template.call_params) != len(scan.calls):
            template = None
        call_params, covered = (
            self._sort_parameters(scan, list(scan.calls), *self._sorting)
            if template is None
            else self._templated_parameters(template)
        )
        scan, template, call_params, covered = self._take_regions(
            losses, key, scan, (call_params, covered), batch_dim if regions else None, template
        )
        if batch_dim is not None and self.regions is None and self.explicit:
            full = self._with_parents(losses, key, scan)
            if self.parents:
                call_params, covered = self._sort_parameters(full, list(full.calls), *self._sorting)
                return full, None, call_params, covered
        return scan, template, call_params, covered

    def _with_parents(self, losses: Tensor, key: str, scan: GraphScan) -> GraphScan:
        """The scan with split parents' calls taken whole, if it has any (then sets
        :attr:`parents`), else ``scan``."""
        if any(r.split for r in scan.calls):  # (taken already: the engine's task-mode scan)
            self.parents = True
            return scan
        assert losses.grad_fn is not None
        full = scan_graph([losses.grad_fn], key, parents=True)
        self.parents = full.calls.keys() != scan.calls.keys()
        return full if self.parents else scan

    def _take_regions(
        self,
        losses: Tensor,
        key: str,
        scan: GraphScan,
        sorted_: tuple[list[list[Tensor]], dict[int, int]],
        batch_dim: int | None,
        template: StepTemplate | None,
    ) -> tuple[GraphScan, StepTemplate | None, list[list[Tensor]], dict[int, int]]:
        """The scan with the regions' calls recorded as expanded along the batch, the template
        and the calls' parameters and coverage, when the step reads regions (:attr:`regions`;
        per-sample mode, ``batch_dim``); as they were otherwise (derived afresh when the
        template was the regions' and this step found none)."""
        call_params, covered = sorted_
        self.region_params, self.regions, self.unindexed = [], None, frozenset()
        if batch_dim is not None and losses.dim() > batch_dim:
            self.regions = self._find_regions(losses, key, scan, sorted_, batch_dim, template)
        if self.regions is None:
            if template is not None and template.regions:
                call_params, covered = self._sort_parameters(scan, list(scan.calls), *self._sorting)
                template = None
            return scan, template, call_params, covered
        if template is None:  # the regions' parameters join their modules' calls, if any
            regional = {id(p) for p in self.region_params}
            call_params, covered = self._sort_parameters(
                scan, list(scan.calls), *self._sorting, regional=regional
            )
            for p in self.region_params:  # (the regions' rows count as one more call)
                covered[id(p)] = covered.get(id(p), 0) + 1
        found = self.regions.records
        calls = {found.get(id(r), r): edges for r, edges in scan.calls.items()}
        return GraphScan(calls, scan.outside_leaves), template, call_params, covered

    def _find_regions(
        self,
        losses: Tensor,
        key: str,
        scan: GraphScan,
        sorted_: tuple[list[list[Tensor]], dict[int, int]],
        batch_dim: int,
        template: StepTemplate | None,
    ) -> Regions | None:
        """The step's sample-shared regions when it needs them (parameters read outside any
        call, or a call whose output does not index the samples) and every parameter read
        outside a call is read in them (:attr:`region_params`: :attr:`explicit` then holds
        none)."""
        b = losses.shape[batch_dim]
        if b <= 1 or (template is not None and not template.regions):
            return None
        if template is not None:
            params, modules = template.regional, template.unindexed
        else:
            params, modules = self.explicit, self._unindexed(scan, sorted_[0], b, batch_dim)
            if not params and not modules:
                return None
        self.unindexed = modules
        # (what a product may read: those parameters, those calls' outputs, by id)
        shared = {id(p) for p in params}
        shared.update(
            id(e.node) for r, es in scan.calls.items() if id(r.module) in modules for e in es if e
        )
        assert losses.grad_fn is not None
        regions = find_regions([losses.grad_fn], key, scan, b, batch_dim, shared)
        if regions is None:
            return None
        inside = {id(t) for t in regions.leaves}
        if any(id(p) not in inside for p in self.explicit):
            return None
        self.region_params = [p for p in [*self.shared, *self.specific] if id(p) in inside]
        self.explicit = []
        return regions

    def _unindexed(
        self, scan: GraphScan, call_params: list[list[Tensor]], b: int, batch_dim: int
    ) -> frozenset[int]:
        """The modules (ids) of the calls with parameters whose outputs do not index the ``b``
        samples."""
        self.b = b
        try:
            self._sample_layouts(scan, call_params, batch_dim)
        except NotPerSample as err:
            return frozenset(err.modules)
        return frozenset()

    def _templated_parameters(
        self, template: StepTemplate
    ) -> tuple[list[list[Tensor]], dict[int, int]]:
        """:meth:`_sort_parameters`' results, as an earlier step of this structure found them."""
        self.explicit = template.explicit
        return template.call_params, template.covered

    def _read_by_values_again(
        self, scan: GraphScan, template: StepTemplate, batch_dim: int
    ) -> None:
        """Reads again, from this step's graph, the calls whose template reading rested on
        index values (:attr:`Layout.by_values`), their producers read as the template says;
        raises :class:`ReadingChanged` (before the backward pass) where one reads otherwise."""
        records = list(scan.calls)
        if not any(layout.by_values for layout in template.layouts):
            return
        layouts = dict(zip(map(id, records), template.layouts))
        producers = _OutputNodes(scan)

        def source_dim(node: object, nr: int) -> tuple[Held, tuple[int, ...]] | None:
            hit = producers.at(node, nr)
            layout = None if hit is None else layouts.get(id(hit[0]))
            if hit is None or layout is None or layout.dims is None:
                return None
            return _held_at(hit[0], hit[1], layout)

        for record, layout in zip(records, template.layouts):
            if not layout.by_values:
                continue
            again = self._reading(record, batch_dim, source_dim)
            if isinstance(again, str) or again[:3] != layout[:3] or not again.by_values:
                raise ReadingChanged(f"{self.label(record.module)} reads its samples otherwise")
        pairs = zip(records, template.layouts)
        self.by_values = frozenset(id(r.module) for r, layout in pairs if layout.by_values)

    def _template(
        self,
        scan: GraphScan,
        call_params: list[list[Tensor]],
        covered: dict[int, int],
        batch_dim: int | None,
    ) -> StepTemplate:
        """This step's :class:`StepTemplate`, with the calls' layouts (which raises
        :class:`NotPerSample` before the backward pass, when nothing is spent yet)."""
        layouts = self._sample_layouts(scan, call_params, batch_dim)
        pairs = list(zip(scan.calls, layouts))
        self.gathered = frozenset(id(r.module) for r, layout in pairs if layout.rows is not None)
        #: the modules (ids) whose readings rest on index values (:attr:`Layout.by_values`)
        self.by_values = frozenset(id(r.module) for r, layout in pairs if layout.by_values)
        expected = self._expected_by_values
        if expected is not None and self.by_values != expected:
            raise ReadingChanged(
                "a reading that rested on index values at the structure's check differs"
            )
        regions = self.regions is not None
        return StepTemplate(
            call_params, covered, self.explicit, layouts, regions, list(self.region_params),
            self.unindexed, self.parents,
        )  # fmt: skip

    def _differentiate(
        self, losses: Tensor, plan: StepPlan, retain_graph: bool, state: VmapState
    ) -> None:
        """The backward pass to the calls' outputs and the explicit parameters, and each
        call's rule (:attr:`rule_parameters`), which holds the call's output gradients until
        the update."""
        scan, records = plan.scan, plan.records
        inside = set() if self.regions is None else self.regions.record_ids
        edges = [(r, i, e) for r in records for i, e in enumerate(scan.calls[r]) if e is not None]
        #: ``(call, tapped index, edge)`` of each output the backward reaches
        self.call_edges: list[tuple[CallRecord, int, GradientEdge]] = edges
        edges = [edge for edge in edges if id(edge[0]) not in inside]
        entries = [] if self.regions is None else self.regions.entries
        inputs = [e for _, _, e in edges] + self.explicit
        batched = self.T > 1
        grads = _backward(
            losses, inputs + [e.at for e in entries], plan.grad_outputs, batched,
            retain_graph, state,
        )  # fmt: skip
        self.backward_inputs: list = inputs
        per_record = self._sort_gradients(records, edges, grads[: len(inputs)], batched)
        self.rule_parameters: list[RuleParameters] = []
        self.generic_modules: set[int] = set()
        if self.regions is not None:
            at_entries = grads[len(inputs) :]
            rows, region_inputs = self._region_gradients(
                at_entries, per_record, plan, retain_graph, state
            )
            self.backward_inputs += region_inputs
        for r, ps in zip(records, plan.call_params):
            if ps:
                call = self._call(r, per_record[id(r)], ps, plan.layouts, batched)
                self.rule_parameters.append(self._rule_parameters(call, plan))
        if self.region_params:  # (last: the regions' backward gave their rows)
            self.rule_parameters.append(self._region_rule(rows, plan.covered))

    def _region_gradients(
        self,
        at_entries: list[Tensor | None],
        per_record: dict[int, list[Tensor | None]],
        plan: StepPlan,
        retain_graph: bool,
        state: VmapState,
    ) -> tuple[list[Tensor], list]:
        """The second backward of :mod:`._regions`: from each entry's shared input, with each
        (task, sample)'s gradient there as a row, to the regions' calls' outputs (into
        ``per_record``) and to their parameters read directly. Returns their rows
        ``[b, T, *p.shape]``, and the inputs of that backward (call edges, then parameters)."""
        assert self.regions is not None and self.batch_dim is not None
        b, t, batched, batch_dim = self.b, self.T, self.T > 1, self.batch_dim
        entries, cotangents = [], []
        for entry, grad in zip(self.regions.entries, at_entries):
            if grad is not None:
                entries.append(entry)
                cotangents.append(entry.per_sample(grad, b, batch_dim, batched))
        calls = [
            (r, i, e)
            for r in self.regions.records.values()
            for i, e in enumerate(plan.scan.calls[r])
            if e is not None
        ]
        inputs = [e for _, _, e in calls] + self.region_params
        grads = (
            region_backward(entries, cotangents, inputs, retain_graph, state)
            if entries
            else [None] * len(inputs)
        )
        for (record, index, _), grad in zip(calls, grads):
            if grad is not None:
                assert record.unexpanded is not None
                new = len(record.tapped[0].shape) > len(record.unexpanded[2])
                per_record[id(record)][index] = to_call_gradient(grad, t, batch_dim, batched, new)
        rows = [
            torch.zeros((b, t, *p.shape), dtype=p.dtype, device=p.device)
            if g is None
            else dense(g).unflatten(0, (t, b)).transpose(0, 1)
            for p, g in zip(self.region_params, grads[len(calls) :])
        ]
        return rows, inputs

    def _region_rule(self, rows: list[Tensor], covered: dict[int, int]) -> RuleParameters:
        """The regions' parameters read directly, with their rows, as one more call's rule
        (:class:`~._regions.RegionRows`): a parameter a module's call uses too (a tied head
        read as ``F.linear(h, embedding.weight)``) has its rows summed over both."""
        record = CallRecord(REGION, (), {}, [])  # (the rows, taken as one call of their own)
        call = Call(record, [], self.region_params, self.batch_dim, self.b, self.T)
        return RuleParameters.of(
            RegionRows(call, rows), self.region_params, self.shared_ids, covered
        )

    def _call(
        self,
        record: CallRecord,
        grads: list[Tensor | None],
        params: list[Tensor],
        layouts: dict[int, Layout],
        batched: bool,
    ) -> Call:
        """A call that has parameters of this step, with its gradients (in its outputs' shapes:
        a call read at its output's base gets the base's gradient) and layout (a call on entries
        gathered from the samples' re-laid for its rule: :mod:`._gathered`)."""
        dims, group, own_dim, rows, _ = layouts[id(record)]
        lead = 1 if batched else 0
        if record.from_base:
            grads = [
                g if g is None else g.reshape(*g.shape[:lead], *t.shape)
                for g, t in zip(grads, record.tapped)
            ]
        if rows is not None and registered_rule(record.module) is not None:  # sample-major
            assert dims is not None
            record, grads, group = sample_major(record, grads, rows, self.b, dims[0], lead)
            rows = None  # (the generic rule takes the call as made: :attr:`Call.rows`)
        return Call(
            record,
            grads,
            params,
            self.batch_dim if own_dim is None else own_dim,
            self.b,
            self.T,
            out_dims=dims,
            stacked=batched,
            group=group if isinstance(group, int) else 1,
            groups=None if isinstance(group, int) else group,
            rows=rows,
        )

    def _sort_gradients(
        self, records: list[CallRecord], edges: list, grads: list, batched: bool
    ) -> dict[int, list[Tensor | None]]:
        """The backward's gradients by call (per tapped output, ``None`` where unreached), and
        the explicit parameters' rows ``[T, *p.shape]`` (:attr:`explicit_rows`)."""
        per_record: dict[int, list[Tensor | None]] = {
            id(r): [None] * len(r.tapped) for r in records
        }
        for (record, index, _), grad in zip(edges, grads):
            per_record[id(record)][index] = grad
        self.explicit_rows = self._autograd_rows(self.explicit, grads[len(edges) :], batched)
        return per_record

    def _autograd_rows(
        self, params: list[Tensor], grads: list[Tensor | None], batched: bool
    ) -> list[Tensor]:
        """Rows ``[T, *p.shape]`` of parameters differentiated by the backward itself: a
        sparse gradient (a sparse lookup outside any call) made dense, one row given its row
        dimension, zeros where unreached."""
        rows = []
        for p, grad in zip(params, grads):
            if grad is None:
                rows.append(torch.zeros((self.T, *p.shape), dtype=p.dtype, device=p.device))
            else:
                rows.append(dense(grad) if batched else dense(grad).unsqueeze(0))
        return rows

    def _rule_parameters(self, call: Call, plan: StepPlan) -> RuleParameters:
        """The call's rule with its parameters sorted; notes the modules the generic rule
        re-runs (:attr:`generic_modules`)."""
        rule = make_rule(call)
        module = call.record.module
        if isinstance(rule, GenericRule):
            rule.label = self.label(module)
            rule.whole = id(module) in plan.whole_modules
            self.generic_modules.add(id(module))
        return RuleParameters.of(rule, call.params, self.shared_ids, plan.covered)

    def checked(self, losses: Tensor, retain_graph: bool) -> None:
        """The engine's check, made on a kept graph, is over: free the graph as a step without
        ``retain_graph`` does (the update needs nothing more from it)."""
        if not retain_graph:
            self.release_graph(losses)

    def release_graph(self, losses: Tensor) -> None:
        """Free the part of the losses' graph a non-retaining step frees (from the losses to the
        calls' outputs and the explicit parameters), after a step that kept it: one backward
        of zeros to the same inputs, so that stepping twice on the same losses fails as it does
        on every other step."""
        if self.backward_inputs:
            zeros = torch.zeros_like(losses)
            # torch's stub takes all tensors or all edges; autograd.grad takes a mix of both.
            torch.autograd.grad(
                losses,
                self.backward_inputs,
                zeros,
                allow_unused=True,
            )

    def label(self, module: torch.nn.Module) -> str:
        """How messages name ``module``: its path in the model and its type."""
        return self.labels.get(id(module)) or type(module).__name__

    def _sort_parameters(
        self,
        scan: GraphScan,
        records: list[CallRecord],
        explicit_modules: frozenset[int],
        assume_reached: bool,
        regional: set[int] | None = None,
    ) -> tuple[list[list[Tensor]], dict[int, int]]:
        """Each call's parameters (those of this step that take rows from its rule), how many
        calls cover each parameter, and :attr:`explicit`: the parameters whose rows come
        straight from autograd (used outside any call, of an ``explicit_modules`` module, or
        reached through no recorded call), but the ``regional`` ones (ids: read directly in
        sample-shared regions, whose rows come from the regions' backward)."""
        regional = regional or set()
        wanted = {id(p): p for p in [*self.shared, *self.specific]}
        explicit = {
            id(t): t for t in scan.outside_leaves if id(t) in wanted and id(t) not in regional
        }
        for record in records:
            if id(record.module) in explicit_modules:
                params = _parameters_of(record.module)
                explicit.update((id(p), p) for p in params if id(p) in wanted)
        call_params: list[list[Tensor]] = []
        covered: dict[int, int] = {}
        for record in records:
            params = []
            for p in _parameters_of(record.module):
                if id(p) in wanted and id(p) not in explicit:
                    params.append(p)
                    covered[id(p)] = covered.get(id(p), 0) + 1
            call_params.append(params)
        for pid, p in wanted.items():  # reached through no recorded call: straight from autograd
            if (
                assume_reached
                and pid not in covered
                and pid not in explicit
                and pid not in regional
            ):
                explicit[pid] = p
        self.explicit = list(explicit.values())
        return call_params, covered

    def _grad_outputs(self, losses: Tensor, batch_dim: int | None) -> Tensor:
        """Sets ``b``, ``T`` and the rows' :attr:`order`; the backward's ``grad_outputs``
        (``[rows, *losses.shape]``, or ``losses.shape`` for one row)."""
        n = losses.numel()
        self.order: Tensor | None = None
        if batch_dim is None:
            self.b, self.T = 1, n
            eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
            return eye.reshape(n, *losses.shape) if n > 1 else eye.reshape(losses.shape)
        self.b = losses.shape[batch_dim]
        self.T = n // self.b
        if self.T == 1:  # one loss per sample: a single ordinary backward
            return torch.ones_like(losses)
        eye = torch.eye(self.T, dtype=losses.dtype, device=losses.device)
        moved_shape = [self.b, *(s for d, s in enumerate(losses.shape) if d != batch_dim)]
        grad_outputs = eye[:, None, :].expand(self.T, self.b, self.T)
        grad_outputs = grad_outputs.reshape(self.T, *moved_shape).movedim(1, batch_dim + 1)
        if batch_dim != 0:  # the rows' order is not the losses' row-major one
            self.order = torch.arange(n).reshape(losses.shape).movedim(batch_dim, 0).reshape(-1)
        return grad_outputs

    def _sample_layouts(
        self, scan: GraphScan, call_params: list[list[Tensor]], batch_dim: int | None
    ) -> list[Layout]:
        """Per call, in the scan's order, its :class:`Layout`; raises :class:`NotPerSample`
        before the backward pass, when nothing is spent yet. A call made on activations traced
        back to another call's output reads where that output holds the samples
        (:func:`._sample_dims.moved_sample_dim`): a producer not read yet is read then, its own
        input traced in turn (up to :data:`_NESTED_READINGS` deep; deeper, or met again while
        it is read, it is read without tracing)."""
        records = list(scan.calls)
        if batch_dim is None:
            return [Layout(None, 1) for _ in records]
        params_of = {id(r): ps for r, ps in zip(records, call_params)}
        found: dict[int, Layout | str] = {}
        producers = _OutputNodes(scan)

        def untraced(node: object, nr: int) -> None:
            return None

        reading: list[int] = []  # the calls being read, innermost last

        def source_dim(node: object, nr: int) -> tuple[Held, tuple[int, ...]] | None:
            hit = producers.at(node, nr)
            if hit is None or not params_of[id(hit[0])]:
                return None
            record, index = hit
            layout = found.get(id(record))
            if layout is None and (id(record) in reading or len(reading) >= _NESTED_READINGS):
                layout = self._reading(record, batch_dim, untraced)
            elif layout is None:
                reading.append(id(record))
                layout = found[id(record)] = self._reading(record, batch_dim, source_dim)
                reading.pop()
            if isinstance(layout, str) or layout.dims is None:
                return None
            return _held_at(record, index, layout)

        for record in reversed(records):
            if params_of[id(record)] and id(record) not in found:
                reading.append(id(record))
                found[id(record)] = self._reading(record, batch_dim, source_dim)
                reading.pop()
        problems = {id(r.module): f for r in records if isinstance(f := found.get(id(r)), str)}
        if problems:
            raise NotPerSample(next(iter(problems.values())), list(problems))
        return [_as_layout(found.get(id(r))) for r in records]

    def _reading(self, record: CallRecord, batch_dim: int, source_dim: SourceDim) -> Layout | str:
        """Where the call's outputs hold the samples, or why they cannot be split per sample.
        A recurrent layer or ``MultiheadAttention`` holds them where its ``batch_first`` says
        (a time-major one inside a batch-first model, fed ``x.transpose(0, 1)``, along 1)."""
        label = self.label(record.module)
        declared = declared_sample_dim(record.module)
        base = batch_dim if declared is None else declared
        dims = output_sample_dims(record, base)
        group = _sample_group(record, dims, self.b, label)
        if declared is None:
            at = not isinstance(group, str)
            moved = moved_sample_dim(record, batch_dim, self.b, at, source_dim)
            if moved is not None:  # a layer called on a tensor whose samples were moved
                own = None if moved.rows is not None and moved.dim == batch_dim else moved.dim
                dims = [moved.dim] * len(record.tapped)
                return Layout(dims, 1, own, moved.rows, moved.by_values)
        if isinstance(group, str):
            return group
        return Layout(dims, group, None if base == batch_dim else base)

    def _to_original(self, square: Tensor) -> Tensor:
        if self.order is None:
            return square
        inverse = torch.argsort(self.order)
        return square[inverse][:, inverse]

    def shared_rows(self) -> list[Tensor]:
        """The rows ``[b, T, *p.shape]`` of the shared parameters that no single rule's
        Gramian covers: those used by several calls (rows summed over the calls, so that the
        cross terms are there) and the explicit ones (straight from autograd)."""
        return [rows for _, rows in self._shared_rows_by_parameter()]

    def _shared_rows_by_parameter(self) -> list[tuple[Tensor, Tensor]]:
        """:meth:`shared_rows` with their parameters, as ``(parameter, rows)``."""
        return [*self._tied_rows(), *self._explicit_shared_rows()]

    def _tied_rows(self) -> list[tuple[Tensor, Tensor]]:
        """The rows of each shared parameter used by several calls, summed over the calls."""
        return [(p, summed_rows(p, rules)) for p, rules in self._tied_calls()]

    def _tied_calls(self) -> list[tuple[Tensor, list[LayerRule]]]:
        """Each shared parameter used by several calls, with those calls' rules (in the calls'
        order)."""
        tied: dict[int, tuple[Tensor, list[LayerRule]]] = {}
        for parts in self.rule_parameters:
            for p in parts.several:
                tied.setdefault(id(p), (p, []))[1].append(parts.rule)
        return list(tied.values())

    def _loose_and_tied(
        self,
    ) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, list[LayerRule]]]]:
        """What :meth:`gramian` gives :func:`._held_rows.hold_rows` besides the calls: the
        rows formed already (the explicit shared parameters'), and each tied parameter with its
        calls' rules (its rows are summed over them in ``R``)."""
        return self._explicit_shared_rows(), self._tied_calls()

    def _explicit_shared_rows(self) -> list[tuple[Tensor, Tensor]]:
        """``(parameter, [1, T, *p.shape])`` of the shared parameters whose rows come straight
        from autograd."""
        return [
            (p, rows.unsqueeze(0))
            for p, rows in zip(self.explicit, self.explicit_rows)
            if id(p) in self.shared_ids
        ]

    def _alone_terms(self, formed: set[int]) -> Iterable[Tensor]:
        """The Gramian terms of the shared parameters used by one call each, from its rule
        (but those of the calls whose rows are ``formed``: ids of their :class:`RuleParameters`)."""
        return (
            parts.rule.gramian(parts.alone)
            for parts in self.rule_parameters
            if parts.alone and id(parts) not in formed
        )

    def _held_rows_budget(self) -> int:
        """Bytes of rows :meth:`gramian` may hold (:func:`._held_rows.held_rows_budget` of the
        output gradients the step holds)."""
        grads = [g for parts in self.rule_parameters for g in parts.rule.call.grads]
        return held_rows_budget(sum(g.numel() * g.element_size() for g in grads if g is not None))

    def _sliced_rows_budget(self) -> int:
        """Bytes of rows a tied parameter's Gramian forms at once where its rows are not held
        (:func:`._held_rows.tied_gramian`): the held-rows budget."""
        return self._held_rows_budget()

    def gramian(self) -> Tensor:
        """``G = J Jᵀ`` over the shared parameters, ``[m, m]`` in the losses' row-major order.

        The rows it forms anyway are held for :meth:`gradients` (:attr:`held`)."""
        loose, tied = self._loose_and_tied()
        held, rest, formed = hold_rows(
            self.rule_parameters,
            loose,
            tied,
            (self._held_rows_budget(), self._sliced_rows_budget()),
            (self.b, self.T),
            (self.rows_buffer, self),
        )
        self.held = held
        rows = held.gramian()
        terms = itertools.chain(
            [] if rows is None else [rows.reshape(self.b, self.T, self.b, self.T)],
            self._alone_terms(formed),
            rest,
        )
        return self._sum_terms(terms)

    def _give_back_rows(self) -> None:
        """The update from the held rows is computed: the engine's matrix may serve the next
        step (a later :meth:`gradients` takes every update from the rules)."""
        self.held = None
        if self.rows_buffer is not None:
            self.rows_buffer.give_back(self)

    def _sum_terms(self, terms: Iterable[Tensor]) -> Tensor:
        """The Gramian from its ``[b, T, b, T]`` terms (summed as they come, so that one is
        held at a time), ``[m, m]`` in the losses' order."""
        n = self.b * self.T
        total: Tensor | None = None
        for term in terms:
            total = term if total is None else total + term
        if total is None:
            return torch.zeros(n, n, device=self.device)
        return self._to_original(total.reshape(n, n))

    def moved(self, weights: Tensor) -> Tensor:
        """Weights in the losses' row-major order, as the rules' ``[b, T]``."""
        flat = weights.reshape(-1)
        if self.order is not None:
            flat = flat[self.order]
        return flat.view(self.b, self.T)

    def gradients(
        self, weights: Tensor | None, weigh_specific: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The update of the shared parameters (``Σ wᵢ ∇ℓᵢ``, ``weights`` in the losses'
        row-major order) and of the specific ones (``Σᵢ ∇ℓᵢ``; with ``weigh_specific``, also
        ``Σ wᵢ ∇ℓᵢ``)."""
        b, t = self.b, self.T
        moved = None if weights is None else self.moved(weights)
        ones: Tensor | None = moved if weigh_specific else None
        found: dict[int, Tensor] = {}
        skip: set[int] = set()
        self.partitioned = []
        if self.held is not None and moved is not None:
            found, products = self.held.updates(moved)
            skip = self.held.ids
            self.partitioned += products
            self._give_back_rows()

        def add(p: Tensor, grad: Tensor) -> None:
            found[id(p)] = grad if id(p) not in found else found[id(p)] + grad

        for parts in self.rule_parameters:
            rule, specific = parts.rule, parts.specific
            shared = [p for p in parts.shared if id(p) not in skip] if skip else parts.shared
            if shared:
                assert moved is not None
                for p, g in zip(shared, rule.weighted(shared, moved)):
                    add(p, g)
            if specific:
                if ones is None:
                    ones = torch.ones(b, t, dtype=specific[0].dtype, device=specific[0].device)
                for p, g in zip(specific, rule.weighted(specific, ones)):
                    add(p, g)
        for p, rows in zip(self.explicit, self.explicit_rows):
            if id(p) in skip:
                continue
            if id(p) in self.shared_ids or weigh_specific:
                assert moved is not None
                add(p, torch.tensordot(moved.reshape(-1).to(rows.dtype), rows, dims=1))
            else:
                add(p, rows.sum(0))

        def pick(p: Tensor) -> Tensor:
            grad = found.get(id(p))
            if grad is None:
                return torch.zeros_like(p)
            return grad if grad.shape == p.shape else grad.reshape(p.shape)

        return [pick(p) for p in self.shared], [pick(p) for p in self.specific]
