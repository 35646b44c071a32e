r"""The Gramian engine: ``G = J Jᵀ`` of the losses' Jacobian, layer by layer, from forward hooks.

How it works (details in :mod:`._records`, :mod:`._graph`, :mod:`._step`, :mod:`.rules`):

* **Hooks.** The parent-most modules with direct trainable parameters are hooked
  (:mod:`._selection`). A hook stores a record of the call (module, inputs, output shapes) in the
  ``metadata`` of its outputs' ``grad_fn`` nodes, so it lives and dies with the graph; nothing is
  kept on the engine and a plain forward/backward pays only the hook call.
* **One backward** from the losses to the hooked calls' outputs gives the output gradients ``D``
  (``T`` rows at once by vmap; ``T = 1`` for per-sample losses); the modules' own weight
  gradients are never computed by autograd.
* **Per-layer rules** turn ``(inputs, D)`` into the call's Gramian contribution without the full
  Jacobian: ``Linear``, ``Conv1d/2d``, ``Embedding`` and the affine parameters of ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` have closed forms (e.g. ``(AAᵀ)⊙(DDᵀ)`` for a
  ``Linear`` layer on per-sample losses); every other module falls back to ``torch.func``
  (``vjp`` of a re-run of the call, vmapped over rows and samples).
* **Exactness.** Parameters used by several calls (a module called twice, an embedding tied to an
  output layer) have their rows summed over the calls before their Gram matrix is taken;
  parameters used outside any hooked call get their rows straight from autograd.

Cost model, per hooked ``Linear``-like layer with ``b`` samples, ``S`` positions per sample,
``T`` losses per sample, ``d`` inputs and ``o`` outputs: the backward costs ``T`` times the
activation-gradient part of an ordinary backward; the Gramian costs
``min(bTSod + (bT)²od, b²d + (bT)²o)`` for ``S = 1`` (``(bS)²d + b²S²To + b²T²So`` for the
contraction when ``S > 1``); the update is one ordinary weight-gradient product. The generic
fallback costs one forward of the module plus ``bT`` vector-Jacobian products and ``bT·n``
memory for its ``n`` parameters.

Exactness, whatever the model does (details in :mod:`._certify` and :mod:`.rules.generic`):

* a module handled by the ``torch.func`` fallback is re-run once per step; the re-run draws the
  recorded call's random numbers (dropout in training mode is exact), never updates buffers or
  attributes a second time, and is checked against autograd on the first step of each graph
  structure; a re-run that fails or differs gives way to autograd's rows for that module;
* with ``batch_dim``, a call whose output is shared by the samples (a position embedding
  ``wpe(arange(t))`` of shape ``[t, d]`` or ``[1, t, d]``) is expanded along the batch by its
  forward hook once a step has seen it broadcast against the samples by ``+``, ``-``, ``*`` or
  ``/`` only (:mod:`._shared`): the forward computes the same values, and the backward gives
  each sample its own output gradient, so the steps stay per-sample (that first step takes one
  backward row per loss, without a warning);
* with ``batch_dim``, the same check certifies that each loss depends on its own sample only
  (losses that mix samples, a permuted loss vector, an operation that mixes samples after a
  hooked module, a shared call that is not expanded): where it does not, or where a hooked
  output does not index the samples, the step takes one backward row per loss (exact, ``b``
  times the backward passes) and warns once (:class:`EngineRouteWarning`), naming the modules
  by their path in the model;
* with explicit parameters (used outside hooked calls) the backward needs one row per loss, so
  per-sample losses then cost ``b`` backward rows instead of one (still exact), and the engine
  warns once, naming them;
* the Gramian is returned in the losses' dtype promoted with the parameters' (half-precision
  losses of a float32 model get a float32 Gramian).
"""

from __future__ import annotations

import functools
import itertools
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any, TypeVar, cast

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from ..introspection import leaf_reach
from ..linalg.gramian import generalize_gramian
from ..linalg.torch_errors import OutOfMemoryError
from ..linalg.user_frame import user_stacklevel
from ..stray_gradients import StrayGradientWatch, stray_gradients_message
from ._certify import (
    EngineRouteWarning,
    Route,
    draw_probe_weights,
    failing_modules,
    held_probe,
    routing_free,
    signature,
)
from ._graph import GraphScan, scan_graph
from ._held_rows import RowsBuffer
from ._records import PendingCalls, make_hook, make_pre_hook
from ._sample_dims import samples_at_batch_dim
from ._selection import (
    batch_norms,
    check_disjoint,
    hooked_modules,
    is_split_parent,
    module_labels,
    parameter_labels,
    sample_mixing_problem,
)
from ._shared import SharedCalls, learn, make_root_hooks, tap_additions, unsafe_expansions
from ._step import (
    GramianStep,
    NotPerSample,
    ReadingChanged,
    StepTemplate,
    VmapState,
    parameter_ids,
)
from ._streaming import StreamingStep
from .rules._base import registered_rule

_F = TypeVar("_F", bound=Callable[..., Any])

__all__ = ["Engine", "EngineRouteWarning", "gramian_dtype"]

#: at most this many graph structures' routes are remembered (the oldest is dropped first)
_MAX_ROUTES = 64
#: What a step is built from: the losses, their graph scan, the shared and the specific
#: parameters, and whether every loss is assumed to reach the parameters.
_StepOptions = tuple[Tensor, GraphScan, list[Tensor], list[Tensor], bool]

_COUNTER = itertools.count()


def gramian_dtype(losses_dtype: torch.dtype, params: Iterable[Tensor]) -> torch.dtype:
    """The dtype a Gramian is returned and weighted in: the losses' promoted with every
    parameter's, so that half-precision losses of a float32 model (``model(x).bfloat16()``) do
    not round a Gramian whose rows are float32 sums to 3 significant digits (issue 19)."""
    dtype = losses_dtype
    for p in params:
        if p.dtype != dtype:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


_TASK_MODE = (
    "The engine computes this structure's steps exactly with one backward row per loss instead "
    "(b times the backward passes of the per-sample path)."
)
_MIXED = (
    "The per-sample losses are not each a function of their own sample only: a loss mixes "
    "samples (e.g. a contrastive loss), the loss vector is permuted, an operation after a hooked "
    "module mixes samples (e.g. h - h.mean(0)), a hooked module's output is shared by the "
    "samples (e.g. a position embedding of shape [t, d] with t equal to the batch size or a "
    "multiple of it), or a hooked module folds the samples with another dimension other than "
    "sample-major (e.g. [s·b, d] rows from sequence-first [s, b, d] activations; [b·s, d] from "
    "[b, s, d] is fine)."
)
_WHOLE = (
    "Re-running these modules one sample at a time (the generic rule, for modules without a "
    "layer rule) did not reproduce autograd's per-sample gradients (an input of batch size that "
    "does not index the samples, such as a [b, b] mask, is sliced as if it did): they are "
    "re-run on the whole batch instead (exact; b times their vector-Jacobian products):"
)
_EXPLICIT = (
    "These parameters are used outside the hooked modules' calls (in a parent's forward that is "
    "not hooked, inside another module's call that receives them, as peft's DoRA does with its "
    "LoRA layers, or in a forward run before the engine's hooks existed, e.g. before "
    "JDOptimizer(modules=...) was built), so their per-sample rows need one backward row per "
    "loss: the engine computes this structure's per-sample steps exactly, with b times the "
    "backward passes. Hooking the module that uses them (modules=model) keeps the single "
    "backward pass:"
)
_RERUN = (
    "Re-running these modules' forward (the generic rule, for modules without a layer rule) did "
    "not reproduce autograd's gradients, so their parameters take their rows straight from "
    "autograd (one backward row per loss) from now on. A forward that depends on state it "
    "changes, that draws random numbers from numpy or Python's random (only torch's generators "
    "are replayed; transformers' SpecAugment masks in wav2vec2-style models do), that "
    "torch.func cannot run, or that returns an output computed from another of its outputs "
    "does this; a layer rule avoids the re-run:"
)


_STREAMING = (
    "low_memory: the low-memory step could not run on this model (its batched backward under "
    "torch.func.vmap, or a layer rule during the backward, failed), so the engine takes the "
    "ordinary exact step, which holds the output gradients until the update"
)


def eager(function: _F) -> _F:
    """``function`` kept out of ``torch.compile``'s tracing: met while compiling, it becomes a
    graph break and runs as Python; outside compilation it costs one ``is_compiling`` check
    (``torch.compiler.disable`` alone would cost a microsecond per call)."""
    disabled = torch.compiler.disable(function)

    @functools.wraps(function)
    def wrapper(*args: Any) -> Any:
        if torch.compiler.is_compiling():
            return disabled(*args)
        return function(*args)

    return cast(_F, wrapper)


def _at_most(named: list[str], separator: str, most: int = 6) -> str:
    """The first ``most`` names joined, and how many more there are."""
    more = f"; and {len(named) - most} more" if len(named) > most else ""
    return separator.join(named[:most]) + more


def _checked_modules(
    modules: tuple[nn.Module | Iterable[nn.Module], ...], batch_dim: int | None
) -> list[nn.Module]:
    """The engine's modules, flattened; raises on anything it cannot hook exactly."""
    flat: list[nn.Module] = []
    for item in modules:
        if isinstance(item, nn.Module):
            flat.append(item)
        else:
            flat.extend(item)
    if not flat:
        raise ValueError("Engine needs at least one module.")
    for module in flat:
        if not isinstance(module, nn.Module):
            raise TypeError(f"Engine takes nn.Module objects, got {type(module).__name__}.")
    if batch_dim is not None and (not isinstance(batch_dim, int) or batch_dim < 0):
        raise ValueError(f"batch_dim must be a non-negative int or None, got {batch_dim!r}.")
    check_disjoint(flat)
    if batch_dim is not None:
        problem = sample_mixing_problem(flat, batch_dim)
        if problem:
            raise ValueError(problem)
    return flat


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class Engine:
    r"""Computes Gramians ``G = J Jᵀ`` of outputs with respect to the modules' parameters.

    Args:
        modules: the modules whose parameters the Jacobian is taken with respect to (disjoint:
            none a submodule of another). A module with direct trainable parameters is hooked and
            differentiated with respect to all its parameters; one without is descended into.
        batch_dim: the dimension of the output (and of every module's tensors) that indexes
            independent samples, or ``None``. With it, modules that mix samples by construction
            (``BatchNorm`` in training mode, batch-statistics ``BatchNorm``, RNNs and attention
            batched on another dimension) are refused; calls whose output is shared by the
            samples (position embeddings) are expanded along the batch after a first step
            (:mod:`._shared`); losses or forwards that mix samples, and shared calls that cannot
            be expanded, are found by the engine's check and computed exactly on a slower route
            (:class:`EngineRouteWarning`).

        low_memory: take each call's Gramian term during the backward pass and let its output
            gradient go, then give the update by a second backward pass (:mod:`._streaming`):
            the step's extra memory falls from about the activations once more (``T`` times
            with ``T`` losses per sample) to the backward's own rows, for one more backward
            pass. The first step of each graph structure, which the engine checks, streams
            too (the check's ``Jᵀv`` is gathered during the backward).

    Messages name modules by their path in the model (``'encoder.1' (BatchNorm1d)``); with
    several modules given, by ``modules[i].path``.

    Use ``engine.close()`` (or ``with Engine(model) as engine:``) to remove the hooks; a dropped
    engine removes them too.
    """

    def __init__(
        self,
        *modules: nn.Module | Iterable[nn.Module],
        batch_dim: int | None = None,
        low_memory: bool = False,
    ):
        flat = _checked_modules(modules, batch_dim)
        self.modules = tuple(flat)
        self.batch_dim = batch_dim
        self.low_memory = bool(low_memory)
        self._batch_norms = batch_norms(flat) if batch_dim is not None else []
        self._key = f"jdoptim.autogram.{next(_COUNTER)}"
        self._hooked = hooked_modules(flat)
        self._labels = module_labels(flat)
        self._parameter_labels = parameter_labels(flat)
        pending = PendingCalls()
        self._shared = None if batch_dim is None else SharedCalls(batch_dim)
        # Under torch.compile the hooks run eagerly, each a graph break: they read autograd
        # nodes and generator states, which a traced graph does not have, and dynamo would
        # otherwise recompile them for every module they are registered on.
        split = frozenset(id(m) for m in self._hooked if is_split_parent(m))
        hook = eager(make_hook(self._key, pending, self._shared, split))
        # always_call: a forward that raises still closes its call's entry in `pending`, which
        # would otherwise collect every later record as made inside it
        handles = [
            m.register_forward_hook(hook, with_kwargs=True, always_call=True) for m in self._hooked
        ]
        self._pending = pending  # (for inspection; the hooks hold no reference to the engine)
        if self._shared is not None:  # the forward's batch size, for sample-shared calls
            root_pre, root_post = make_root_hooks(self._shared)
            root_pre, root_post = eager(root_pre), eager(root_post)
            handles += [m.register_forward_pre_hook(root_pre, with_kwargs=True) for m in flat]
            handles += [
                m.register_forward_hook(root_post, with_kwargs=True, always_call=True) for m in flat
            ]
        pre_hook = eager(make_pre_hook(pending))
        handles += [  # modules whose calls a rule re-runs: their random draws are recorded
            m.register_forward_pre_hook(pre_hook, with_kwargs=True)
            for m in self._hooked
            if (rule := registered_rule(m)) is None
            or getattr(rule, "replays", False)
            or parametrize.is_parametrized(m)  # (the generic rule takes them)
        ]
        self._finalizer = weakref.finalize(self, _remove_all, handles)
        self._vmap = VmapState()
        self._rows_buffer = RowsBuffer()  # (the held rows' matrix, reused: see ._held_rows)
        self._streaming = VmapState()  # whether the low-memory backward runs on this model
        self._routes: dict[tuple, Route] = {}
        #: the routes of structures with calls on gathered entries, by their routing-free key
        #: (whose last item is the gathered calls' modules)
        self._rerouted: dict[tuple, Route] = {}
        #: per structure and route, the last step's template with its key (._step.StepTemplate)
        self._templates: dict[tuple, tuple[tuple, StepTemplate]] = {}
        self._warned: set[str] = set()
        self._generator = torch.Generator().manual_seed(0)

    @property
    def held_rows_bytes(self) -> int:
        """Bytes the engine keeps allocated between steps for the explicit rows a step holds
        from its Gramian to its update (one reused matrix, at most the held-rows budget; see
        :mod:`._held_rows`); 0 with ``low_memory=True``."""
        return self._rows_buffer.nbytes

    @property
    def parameter_labels(self) -> dict[int, str]:
        """How messages name the modules' parameters (their paths in the model), by id."""
        return self._parameter_labels

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove the hooks. Outputs computed afterwards are no longer seen by the engine."""
        self._finalizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def parameters(self) -> list[Tensor]:
        """The trainable parameters of the modules, each once."""
        params = (p for m in self.modules for p in m.parameters() if p.requires_grad)
        return list(dict.fromkeys(params))

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("This engine is closed: its hooks were removed.")
        batch_dim = self.batch_dim  # (batch norms are only watched with a batch_dim)
        if batch_dim is not None and any(
            m.training or not m.track_running_stats for m in self._batch_norms
        ):
            problem = sample_mixing_problem(self.modules, batch_dim)
            if problem:
                raise ValueError(problem)

    def step(
        self,
        losses: Tensor,
        shared: list[Tensor],
        specific: list[Tensor],
        per_sample: bool,
        retain_graph: bool = False,
        assume_reached: bool = True,
    ) -> GramianStep:
        """Run the backward pass of one step; the result gives the Gramian and the update.

        On the first step of each graph structure the engine checks its fast path against
        autograd and, where it fails, takes an exact slower route (see :mod:`._certify`); that
        step keeps the losses' graph. With ``low_memory`` the step keeps the graph for the
        update's second backward pass, run by its ``gradients``; a caller that wants only the
        Gramian frees it with ``step.release_graph(losses)`` (as :meth:`compute_gramian` does)."""
        self._check_open()
        batch_dim = self.batch_dim if per_sample else None
        per_sample = batch_dim is not None
        if losses.grad_fn is None:
            raise ValueError(
                "The losses have no autograd graph (no grad_fn): compute them from the model's "
                "output with gradients enabled."
            )
        losses = samples_at_batch_dim(losses, batch_dim)  # [b] of a sequence-first model
        root = losses.grad_fn
        assert root is not None  # a view of a tensor with a graph
        scan = scan_graph([root], self._key, parents=batch_dim is None)  # (see _step._scanned)
        if self._shared is not None:
            self._check_expansions(scan, losses)
            if batch_dim is not None and losses.dim() > batch_dim:
                learn(self._shared, scan.calls, losses, losses.shape[batch_dim])
                tap_additions(self._shared, scan.calls, losses, losses.shape[batch_dim])
        params = {id(p) for p in shared} | {id(p) for p in specific}
        key = signature(scan, losses, per_sample, params)
        route = self._routes.get(key)
        options: _StepOptions = (losses, scan, shared, specific, assume_reached)
        if route is None and per_sample:
            rerouted = self._rerouted_step(key, options, retain_graph)
            if rerouted is not None:
                return rerouted
        if route is not None:
            known = self._known_route_step(key, route, options, retain_graph)
            if known is not None:
                return known
        step, route = self._certified_step(options, per_sample)
        route = replace(route, by_values=step.by_values)
        step.checked(losses, retain_graph)
        if len(self._routes) >= _MAX_ROUTES:
            del self._routes[next(iter(self._routes))]
        self._routes[key] = route
        if step.gathered and route.per_sample:
            if len(self._rerouted) >= _MAX_ROUTES:
                del self._rerouted[next(iter(self._rerouted))]
            self._rerouted[routing_free(key, step.gathered)] = route
        return step

    def _known_route_step(
        self, key: tuple, route: Route, options: _StepOptions, retain_graph: bool
    ) -> GramianStep | None:
        """The step of a checked structure on its route, with what earlier steps of it derived
        (:class:`._step.StepTemplate`); ``None`` where a reading that rested on index values
        at the check differs now (:class:`._step.ReadingChanged`, raised before the backward
        pass: the step is then checked as a new structure)."""
        _, scan, shared, specific, assume_reached = options
        modules = tuple(parameter_ids(r.module) for r in scan.calls)
        templated: tuple = (key, route, tuple(map(id, shared)), tuple(map(id, specific)))
        templated += (assume_reached, modules)
        try:
            if self.low_memory:
                return self._streaming_step(options, route, retain_graph, template_key=templated)
            return self._make_step(*options, route, retain_graph, template_key=templated)
        except ReadingChanged:
            return None

    def _rerouted_step(
        self, key: tuple, options: _StepOptions, retain_graph: bool
    ) -> GramianStep | None:
        """The step of a structure checked before with other token counts in its experts
        (:func:`._certify.routing_free`), on that structure's route; ``None`` where there is
        none, or where this step does not read the same calls as gathered (then it is checked
        as a new structure, on the graph this step kept)."""
        for gathered in {free[-1] for free in self._rerouted}:
            route = self._rerouted.get(routing_free(key, gathered))
            if route is None:
                continue
            try:
                if self.low_memory:
                    step = self._streaming_step(options, route, True)
                else:
                    step = self._make_step(*options, route, True)
            except NotPerSample:
                return None
            if step.gathered != gathered:
                return None
            step.checked(options[0], retain_graph)
            return step
        return None

    def _streaming_step(
        self,
        options: _StepOptions,
        route: Route,
        retain_graph: bool,
        probe: Tensor | None = None,
        template_key: tuple | None = None,
    ) -> GramianStep:
        """A low-memory step (:mod:`._streaming`; with ``probe``, the check's ``Jᵀv`` gathered
        during its backward), or an ordinary one where ``torch.func.vmap`` cannot run the
        batched backward (found on the first try, remembered, and warned). An error that the
        ordinary step raises as well is the step's, not the low-memory mode's: it propagates,
        and the next step tries the low-memory one again."""
        if self._streaming.works is False:
            return self._make_step(*options, route, retain_graph)
        try:
            kind = functools.partial(StreamingStep, probe=probe)
            step = self._make_step(*options, route, retain_graph, kind, template_key)
        except (RuntimeError, NotImplementedError) as err:
            if self._streaming.works is not None or isinstance(err, OutOfMemoryError):
                raise
            step = self._make_step(*options, route, retain_graph)  # raises if it is the step's
            self._streaming.works = False
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            self._warn(f"{_STREAMING} ({first})")
            return step
        self._streaming.works = True
        return step

    def _make_step(
        self,
        losses: Tensor,
        scan: GraphScan,
        shared: list[Tensor],
        specific: list[Tensor],
        assume_reached: bool,
        route: Route,
        retain_graph: bool,
        kind: Callable[..., GramianStep] = GramianStep,
        template_key: tuple | None = None,
    ) -> GramianStep:
        """The step, reusing what an earlier step of the same structure derived from it where
        ``template_key`` (see :class:`._step.StepTemplate`) finds it, and keeping its own."""
        template = None
        if template_key is not None:
            kept = self._templates.get(template_key[:2])  # (one per structure and route)
            template = kept[1] if kept is not None and kept[0] == template_key else None
        step = kind(
            losses,
            self._key,
            shared,
            specific,
            self.batch_dim if route.per_sample else None,
            retain_graph=retain_graph,
            vmap_state=self._vmap,
            assume_reached=assume_reached,
            scan=scan,
            explicit_modules=route.explicit,
            whole_modules=route.whole,
            labels=self._labels,
            rows_buffer=self._rows_buffer,
            template=template,
            regions=route.regions,
            by_values=None if template_key is None else route.by_values,
        )
        if template_key is not None and template is None and step.template.reusable:
            # (replacing the structure's earlier template, whose parameters may be stale: it
            # holds no tensor that the current one does not, so nothing is kept alive for it)
            if template_key[:2] not in self._templates and len(self._templates) >= _MAX_ROUTES:
                del self._templates[next(iter(self._templates))]
            self._templates[template_key[:2]] = (template_key, step.template)
        return step

    def _certified_step(self, options: _StepOptions, per_sample: bool) -> tuple[GramianStep, Route]:
        """The first step of a structure: the fast route if the check passes, else the next
        exact one (see :mod:`._certify`). Warns once the route is known, with its reason: a
        per-sample failure that one row per loss cures is the samples' dependence; one that
        needs autograd's rows is the re-run's."""
        losses = options[0]
        route = Route(per_sample=per_sample)
        mixed = whole_names = ""
        for _ in range(5):
            v = draw_probe_weights(losses, self._generator)
            try:
                if self.low_memory:
                    step = self._streaming_step(options, route, True, probe=v)
                else:
                    step = self._make_step(*options, route, True)
            except NotPerSample as err:
                if not self._expanded_next(err.modules):
                    self._warn(f"{err} {_TASK_MODE}")
                route = Route(per_sample=False, explicit=route.explicit)
                continue
            probe = step.probe if isinstance(step, StreamingStep) else None
            failed = failing_modules(step, losses, v, probe or held_probe(step, v))
            if failed and step.regions is not None and step.regions.failed(failed):
                route = replace(route, regions=False)  # (their reading failed: without them)
                continue
            if not failed:
                if route.per_sample and step.batch_dim is None and step.explicit and step.T > 1:
                    self._warn(f"{_EXPLICIT} {self._parameter_names(step.explicit)}.")
                elif route.per_sample and route.whole:
                    self._warn(f"{_WHOLE} {whole_names}.")
                elif mixed and not route.explicit:
                    self._warn(f"{_MIXED} Where it shows: {mixed}. {_TASK_MODE}")
                return step, route
            if route.per_sample:
                if not self._expanded_next(id(m) for m in failed):
                    mixed = mixed or self._names(failed)
                re_run = frozenset(id(m) for m in failed if id(m) in step.generic_modules)
                if re_run and not route.whole:
                    whole_names = self._names({m: w for m, w in failed.items() if id(m) in re_run})
                    route = Route(per_sample=True, explicit=route.explicit, whole=re_run)
                    continue
                route = Route(per_sample=False, explicit=route.explicit)
            else:
                self._warn(f"{_RERUN} {self._names(failed)}.")
                route = Route(False, route.explicit | {id(m) for m in failed})
        raise RuntimeError("The engine found no exact route for this step (a bug: report it).")

    def _expanded_next(self, modules: Iterable[int]) -> bool:
        """The modules (ids) are all expandable sample-shared calls: this step, which saw them
        unexpanded, is exact by rows per loss, and the next forwards expand them, so no route
        warning is due (nor for a module whose expansion was refused: its error said so)."""
        shared = self._shared
        if shared is None:
            return False
        announced = shared.read_at_additions | shared.no_longer_expanded
        return all(m in shared.expandable or m in announced for m in modules)

    def _check_expansions(self, scan: GraphScan, losses: Tensor) -> None:
        """Raises if an expanded sample-shared output (see :mod:`._shared`) has a consumer that
        does not broadcast it against the samples: the forward may then differ from the
        model's own, so the step is refused (the module is not expanded again)."""
        assert self._shared is not None
        bad = unsafe_expansions(self._shared, scan.calls, losses)
        if bad:
            names = ", ".join(f"{self._labels.get(id(m), type(m).__name__)}" for m in bad)
            raise RuntimeError(
                f"The engine expanded the output of {names}, shared by the samples, along the "
                "batch (as an earlier step showed it safe), but in this forward an operation "
                "other than a broadcasting +, -, * or / with the batched activations uses it, "
                "so this forward may differ from the model's own. Nothing was changed; run the "
                "forward again: this module's output is no longer expanded (exact, slower)."
            )

    def _names(self, failed: dict[nn.Module, str]) -> str:
        labels = self._labels
        named = [f"{labels.get(id(m), type(m).__name__)} ({why})" for m, why in failed.items()]
        return _at_most(named, "; ")

    def _parameter_names(self, params: list[Tensor]) -> str:
        named = [self._parameter_labels.get(id(p), f"a {tuple(p.shape)} tensor") for p in params]
        return _at_most(named, ", ")

    def _warn(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            warnings.warn(message, EngineRouteWarning, stacklevel=user_stacklevel())

    def compute_gramian(self, output: Tensor, retain_graph: bool = False) -> Tensor:
        r"""The Gramian of ``output`` with respect to the modules' parameters.

        A scalar gives a 0-D Gramian ``‖∇y‖²``; a vector of ``m`` values an ``m × m`` matrix; an
        output of shape ``[m₁, …, m_k]`` the generalized Gramian of shape
        ``[m₁, …, m_k, m_k, …, m₁]`` with ``G[a, reversed(c)] = ⟨∇y_a, ∇y_c⟩`` (see
        :class:`~jdoptim.aggregation.Flattening`). With ``batch_dim``, ``output``'s dimension
        ``batch_dim`` indexes independent samples; a vector ``[b]`` of per-sample losses of a
        sequence-first model (``batch_dim=1``: the model's tensors index the samples along 1)
        is taken as they are, and gives a ``b × b`` Gramian. Frees the graph unless
        ``retain_graph``.
        """
        # The parameters the output reaches, from one walk of its whole graph: a parameter
        # used only inside a hooked call that the engine's scan does not walk into (it walks
        # into a re-run module's call only where hooked calls were made inside it) is covered
        # by no call the scan sees, and must still be differentiated (straight from autograd),
        # not taken as unreached.
        reached = {id(leaf) for leaf, _ in leaf_reach([output])} if output.grad_fn else set()
        watch = StrayGradientWatch(p for p in self.parameters() if id(p) not in reached)
        try:
            step = self.step(
                output,
                [p for p in self.parameters() if id(p) in reached],
                [],
                per_sample=self.batch_dim is not None,
                retain_graph=retain_graph,
            )
            written = watch.written()
            if written:
                raise RuntimeError(stray_gradients_message(self._parameter_names(written)))
        except BaseException:
            watch.restore()
            raise
        with torch.no_grad():
            gramian = step.gramian().to(gramian_dtype(output.dtype, self.parameters()))
        if isinstance(step, StreamingStep):  # it kept the graph for an update: not asked for
            step.release_graph(output)
        return generalize_gramian(gramian, tuple(output.shape))
