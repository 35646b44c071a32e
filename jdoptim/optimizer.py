"""JDOptimizer: Jacobian descent as a drop-in wrapper around any ``torch.optim`` optimizer.

**How a step works** (design). :meth:`JDOptimizer.step` is a short sequence of named phases over
one ``_StepContext`` (the parsed losses, the record, the parameter plan, the names of the
non-finite losses, this step's update computer, the aggregator's snapshot); each phase reads
what the earlier ones put there and adds its own, none reaches back:

1. **parse and plan** (``_parse_and_plan``): the losses become a :class:`~jdoptim.losses.
   LossBatch` (at most ``max_loss_dim`` dimensions), the method's options are checked, the
   graph walk sorts the wrapped optimizer's parameters into shared / specific / foreign /
   unreached. Errors are held, not raised yet;
2. **agree** (``_inputs``): the update computer's ``agree(error, nonfinite)``; locally it
   re-raises the held error, distributed it is the first collective, so that every process
   raises, skips or goes on together (a training loop that catches the error stays in
   lockstep). A non-finite loss anywhere refuses (or skips) the step here;
3. **compute** (``_compute``): :func:`~jdoptim.updates.method.prepare_method` picks the route (the
   optimizer's own computer, or ``features=`` / ``extra_batches=``) and binds the method's
   inputs; a ``GradScaler`` wraps that computer in :class:`~jdoptim.updates.scaled.ScaledUpdate`;
   the result is an :class:`~jdoptim.updates.base.UpdateResult` (gradients, weights, Gramian, typed
   communication statistics). Nothing is written to a parameter before this phase ends;
4. **check** (``computer.check``): a non-finite weight or gradient refuses the step (under a
   ``GradScaler``, nothing is refused: the scaler checks);
5. **apply** (``_apply``): the update is accumulated into ``.grad`` and the computer's
   ``step_optimizer`` runs the wrapped optimizer's step (``grad_scaler.step`` under a scaler,
   which may skip it).

A refusal or a skip at any phase restores the aggregator's state, so parameters, ``.grad`` (on a
refusal), the wrapped optimizer's state and the aggregator's state are as they were.

Everything that depends on the setting (one process or several, a ``GradScaler``, a method's route;
later, sharded parameters) is a member of the update computer's declared interface
(:class:`~jdoptim.updates.base.UpdateComputer`) or a wrapper of it, never an attribute probed here
or a branch in ``step``: a new setting is a new computer or wrapper, and the phases stay as they
are. The scalarizers (:mod:`jdoptim.scalarization`) need one backward and no Gramian: they have
their own step (:mod:`jdoptim.updates.scalarized`).
"""

from __future__ import annotations

import copy
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .aggregation import Aggregator, UPGrad, Weighting
from .aggregation.state import holds_state
from .amp import LossScaling, no_autocast
from .grads import store_gradients
from .linalg.user_frame import user_stacklevel
from .losses import (
    LossBatch,
    check_not_stepped,
    mark_stepped,
    nonfinite_loss_names,
    parse_losses,
    translate_graph_error,
)
from .parameter_plan import ParameterPlan, Scope, plan_parameters
from .record import StepRecord
from .scalarization import Scalarizer
from .stray_gradients import StrayGradientWatch, parameter_names, stray_gradients_message
from .updates.base import (
    NonFiniteJacobianError,
    UpdateComputer,
    UpdateResult,
)
from .updates.jacobian import JacobianUpdate
from .updates.method import (  # [methods] features=, extra_batches=
    CrossBatches,
    check_method_arguments,
    check_method_step,
    prepare_method,
)
from .updates.scalarized import ScalarizedStep, make_scalarized_step
from .updates.scaled import scaled

__all__ = ["JDOptimizer"]

_STATE_KEY = "jdoptim"


class JDOptimizer(Optimizer):
    r"""Wraps a ``torch.optim`` optimizer so that each step is a Jacobian-descent step.

    Instead of ``sum(losses).backward(); opt.step()``, call ``opt.step(losses)``. One step:

    1. walks the losses' autograd graph to find, among the wrapped optimizer's parameters, those
       reached by several losses (*shared*) and by one loss only (*specific*);
    2. computes the Jacobian (or, with ``modules``, only the Gramian ``G = J Jᵀ``) of the losses
       with respect to the shared parameters;
    3. aggregates it, under ``torch.no_grad()``, into one update direction ``d`` (for a
       Gramian-weighted aggregator, ``d = Σᵢ wᵢ ∇ℓᵢ`` with ``w = W(G)``); each specific parameter
       gets its own loss's gradient;
    4. accumulates the result into ``.grad`` (as ``backward()`` would) and calls the wrapped
       optimizer's ``step()``.

    Parameters the losses reach but the wrapped optimizer does not own (*foreign*) are never
    touched; owned parameters no loss reaches keep their ``.grad``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's, so LR schedulers,
    gradient clipping and checkpointing work unchanged. ``state_dict()`` is the wrapped
    optimizer's plus a ``"jdoptim"`` entry with the aggregator's state.

    Step hooks registered on the JDOptimizer run around the whole JD step (before the graph walk,
    after the update); hooks that must see the aggregated ``.grad`` before the update (e.g.
    clipping) belong on the wrapped optimizer: ``opt.optimizer.register_step_pre_hook(...)``.

    Args:
        optimizer: the wrapped ``torch.optim.Optimizer``.
        aggregator: how the Jacobian is aggregated (default: :class:`~jdoptim.aggregation.UPGrad`),
            or a loss-only :class:`~jdoptim.scalarization.Scalarizer` (one backward of the
            scalarized loss; see :mod:`jdoptim.updates.scalarized`).
        modules: modules to hook for the memory-efficient Gramian engine (see
            :mod:`jdoptim.autogram`); ``None`` computes the Jacobian with a batched backward.
        batch_dim: with ``modules``, the dimension of the losses and of the modules' tensors
            that indexes independent samples. A vector of per-sample losses ``[b]`` goes with
            any ``batch_dim``: ``batch_dim=1`` for a sequence-first model (``[s, b, d]``
            activations, ``batch_first=False`` attention) takes ``[b]`` losses as they are.
        scope: ``"shared"`` (default) aggregates over the shared parameters only, and gives each
            specific parameter its loss's own gradient; ``"all"`` aggregates over every reached
            owned parameter.
        nonfinite: on a NaN or infinite loss, weight or gradient: ``"raise"`` (default) raises
            ``FloatingPointError``; ``"skip"`` skips the step (nothing changes; the record
            says why).
        freeze_foreign: set ``requires_grad=False`` on the foreign leaves of each step, so that
            later forward passes do not build graph through them.
        process_group: distributed JD (see :mod:`jdoptim.distributed`): a
            ``torch.distributed.ProcessGroup``, a ``DistributedDataParallel`` model (its group),
            or ``True`` (the default group). Each process passes the losses of its shard; the
            step equals one process's step on the whole batch. Task losses (``batch_dim=None``)
            are each a mean over the local shard; with ``batch_dim=0`` the losses are per-sample
            and the global batch is the concatenation of the shards. When ``torch.distributed``
            is initialised with several processes and the parameters belong to a
            ``DistributedDataParallel`` model, leaving it out is refused at the first step (each
            process would step alone and the replicas would drift apart): pass
            ``process_group=ddp_model``, or ``process_group=False`` to run JD on each process
            alone on purpose.
        low_memory: with ``modules``, the engine takes each layer's Gramian term during the
            backward pass and holds no output gradient, then runs a second backward pass of
            ``Σ wᵢ ℓᵢ`` for the update (:mod:`jdoptim.autogram._streaming`): less memory (the
            step's extra memory drops from about the activations once more, ``T`` times with
            ``T`` task rows, to the backward's own rows) for one more backward pass. A
            scalarizer holds nothing and ignores it.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        aggregator: Aggregator | Scalarizer | None = None,
        *,
        modules: nn.Module | Iterable[nn.Module] | None = None,
        batch_dim: int | None = None,
        scope: Scope = "shared",
        nonfinite: Literal["raise", "skip"] = "raise",
        freeze_foreign: bool = False,
        process_group: object = None,
        low_memory: bool = False,
    ) -> None:
        if aggregator is None:
            aggregator = UPGrad()
        _check_options(optimizer, aggregator, scope, nonfinite)
        not_engine = modules is None or process_group not in (None, False)
        if low_memory and not_engine and not isinstance(aggregator, Scalarizer):
            raise ValueError(
                "low_memory=True is a mode of the single-process Gramian engine: pass "
                "modules=model (and no process_group). Without modules the step holds the "
                "Jacobian itself; see the README's memory section for what each path holds."
            )

        # -- scalarizers (jdoptim.scalarization): their own step, in updates/scalarized.py --
        self._scalarized: ScalarizedStep | None = make_scalarized_step(
            optimizer, aggregator, batch_dim, freeze_foreign, process_group
        )
        if self._scalarized is not None:
            modules = None  # one backward: the Gramian engine's hooks are not needed
        # -- end scalarizers --------------------------------------------------------------------
        self.optimizer = optimizer
        self.aggregator = aggregator
        self.scope: Scope = scope
        self.nonfinite = nonfinite
        self.freeze_foreign = freeze_foreign
        self.batch_dim = batch_dim
        self.last_record: StepRecord | None = None
        self._uses_engine = modules is not None and process_group in (None, False)
        self._ddp_check_pending = process_group is None  # False: per-process JD, on purpose
        self._warned: set[str] = set()  # the warnings given once per optimizer
        self._batch_sizes = _BatchSizes()
        if modules is not None and self._uses_engine and batch_dim is None:
            self._batch_sizes.watch(modules, self)
        self._update_computer: UpdateComputer = self._make_update_computer(
            modules, batch_dim, None if process_group is False else process_group, low_memory
        )

        # What Optimizer.__init__ sets up, minus the parameters (they are the wrapped optimizer's).
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._patch_step_function()

    @staticmethod
    def _make_update_computer(
        modules: nn.Module | Iterable[nn.Module] | None,
        batch_dim: int | None,
        process_group: object = None,
        low_memory: bool = False,
    ) -> UpdateComputer:
        if process_group is not None:
            from .distributed import make_distributed_update  # imported only when used

            return make_distributed_update(process_group, modules, batch_dim)
        if modules is None:
            return JacobianUpdate()
        from .updates.gramian import GramianUpdate  # the engine is imported only when used

        module_list = [modules] if isinstance(modules, nn.Module) else list(modules)
        return GramianUpdate(module_list, batch_dim=batch_dim, low_memory=low_memory)

    # -- the torch.optim surface, delegated to the wrapped optimizer --------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state[_STATE_KEY] = {
            "aggregator": self.aggregator.state_dict(),
            "aggregator_class": type(self.aggregator).__qualname__,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of :meth:`state_dict`, all or nothing.

        The aggregator's part is checked first (the same method, by class name, and the same
        state entries); then the wrapped optimizer's and the aggregator's states are loaded, and
        if either load fails both are put back as they were (the wrapped optimizer's previous
        ``state`` and ``param_groups`` objects, and a copy of the aggregator's state) before the
        error propagates.
        """
        state = dict(state_dict)
        ours = state.pop(_STATE_KEY, None)
        if ours is not None:
            _check_aggregator_state(self.aggregator, ours)
        optimizer_before = (self.optimizer.state, self.optimizer.param_groups)
        aggregator_before = copy.deepcopy(self.aggregator.state_dict())
        try:
            self.optimizer.load_state_dict(state)
            if ours is not None:
                self.aggregator.load_state_dict(ours["aggregator"])
        except BaseException:
            self.optimizer.state, self.optimizer.param_groups = optimizer_before
            self.aggregator.load_state_dict(aggregator_before)
            raise
        self._forget_aggregator_sync()

    def register_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_pre_hook(hook, prepend)

    def register_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_state_dict_post_hook(hook, prepend)

    def register_load_state_dict_pre_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend)

    def register_load_state_dict_post_hook(self, hook: Callable, prepend: bool = False) -> Any:
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend)

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._patch_step_function()

    def __repr__(self) -> str:
        return (
            f"JDOptimizer(\n  optimizer={self.optimizer!r},\n  aggregator={self.aggregator!r},\n"
            f"  scope={self.scope!r}, nonfinite={self.nonfinite!r}\n)"
        )

    # -- the step ------------------------------------------------------------------------

    def _owned_parameters(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    # Not torch.optim's step(closure): JD steps on the losses, and returns their StepRecord.
    def step(  # type: ignore[override]
        self,
        losses: object = None,
        closure: Callable[[], object] | None = None,
        *,
        grad_scaler: Any = None,
        features: Tensor | None = None,  # [methods] see jdoptim.updates.features
        extra_batches: Sequence[object] | None = None,  # [methods] see jdoptim.updates.cross_batch
    ) -> StepRecord:
        """Perform one JD step on ``losses`` and return its :class:`~jdoptim.StepRecord`.

        Args:
            losses: a sequence of scalar loss tensors, a mapping ``name → scalar loss``, or a
                1-D tensor of losses (e.g. per-sample losses).
            closure: alternatively, a callable that recomputes and returns the losses (run with
                gradients enabled), as in ``torch.optim``.
            grad_scaler: a ``torch.amp.GradScaler``: the Jacobian is taken of the scaled losses,
                aggregated unscaled, and ``grad_scaler.step`` replaces the wrapped optimizer's
                step (skipping it on overflow); call ``grad_scaler.update()`` afterwards. See
                :mod:`jdoptim.amp`.
            features: the shared representation ``z`` the losses were computed from: the
                weights come from the Gramian of ``∂ℓᵢ/∂z`` instead of the shared parameters'
                gradients (representation-level JD, see :mod:`jdoptim.updates.features`).
            extra_batches: for methods that weigh the losses by ``J₁J₂ᵀ`` (MoDo, SDMGrad): one
                or two more batches of the same losses on independent data (see
                :mod:`jdoptim.updates.cross_batch`).

        On bad input (no losses, non-tensors, non-scalar entries, losses without a graph or on
        different devices or on ``meta``, losses reaching none of the optimizer's parameters,
        non-finite losses, gradients or weights) it raises before anything changes, or with
        ``nonfinite="skip"`` skips a non-finite step: parameters, ``.grad``, the wrapped
        optimizer's state and the aggregator's state are as they were. Losses whose graph was
        already consumed (by an earlier step on them, or by ``loss.backward()``: ``step``
        replaces it) or saved tensors changed in place since the forward pass raise
        :class:`~jdoptim.losses.StaleGraphError`, which says to recompute the losses. The step
        may run under ``torch.no_grad()`` or ``torch.inference_mode()``: it differentiates the
        graph the losses already have.
        """
        # The step differentiates the losses' existing graph, which no_grad()/inference_mode()
        # around the call do not prevent; a closure's forward pass records its graph.
        grad_was_on = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        check_method_arguments(self._scalarized, features, extra_batches)  # [methods]
        with torch.inference_mode(False), torch.enable_grad():
            if self._scalarized is not None:  # a scalarizer: one backward (updates/scalarized.py)
                return self._scalarized_step(losses, closure, grad_scaler, grad_was_on)
            if closure is not None:
                if losses is not None:
                    raise TypeError("Pass either losses or a closure to step(), not both.")
                losses = closure()
            if losses is None:
                raise TypeError(
                    "JDOptimizer.step() needs the losses: call opt.step([loss1, loss2, ...]) "
                    "instead of backward() + step()."
                )
            if self._ddp_check_pending:
                self._check_not_ddp()
            return self._step(
                losses, grad_scaler, grad_was_on, _MethodArgs(features, extra_batches)
            )

    def _scalarized_step(
        self,
        losses: object,
        closure: Callable[[], object] | None,
        grad_scaler: Any,
        grad_was_on: bool,
    ) -> StepRecord:
        """The step of a scalarizer (:mod:`jdoptim.updates.scalarized`), with the same input
        parsing and DDP check as a JD step."""
        assert self._scalarized is not None
        if self._ddp_check_pending:
            self._check_not_ddp()
        self.last_record = self._scalarized.step(
            losses,
            closure,
            grad_scaler,
            self.nonfinite,
            parse=lambda given: self._parse(given, grad_was_on),
        )
        return self.last_record

    def end_epoch(self) -> None:
        """Close a training epoch, for methods that count epochs (:class:`~jdoptim.
        scalarization.DWA` rolls its loss history); a no-op for the others."""
        if self._scalarized is not None:  # jdoptim.scalarization (updates/scalarized.py)
            self._scalarized.end_epoch()

    # The phases of a step, over one _StepContext: parse (and plan) → agree → compute → check →
    # apply. A refusal at any point leaves the parameters, .grad, the wrapped optimizer's state
    # and the aggregator's state as they were. See the module docstring for the design.

    def _step(
        self, losses: object, grad_scaler: Any, grad_was_on: bool, method: _MethodArgs
    ) -> StepRecord:
        ctx = _StepContext(method=method)
        self._inputs(ctx, losses, grad_scaler, grad_was_on)
        batch, record = ctx.parsed()
        if ctx.bad:
            return self._refuse(
                record,
                f"Non-finite loss value in {', '.join(ctx.bad)}: nothing was updated. Check the "
                "data and the learning rate, or pass nonfinite='skip' to skip such steps.",
            )
        self._note_idle_losses(record, batch, ctx.planned())
        self._warn_if_per_sample(batch)
        return self._update(ctx)

    def _inputs(
        self, ctx: _StepContext, losses: object, grad_scaler: Any, grad_was_on: bool
    ) -> None:
        """The parse, plan and agree phases: parse and check the losses and plan the
        parameters, then agree with the other processes (the update computer's
        :meth:`~jdoptim.updates.base.UpdateComputer.agree`), so that every process refuses a step
        that one refuses (an error raised here on one process is raised there, and a
        ``DistributedStepError`` on the others): a training loop that catches it stays in
        lockstep. Locally, ``agree`` re-raises the error."""
        error: Exception | None = None
        try:
            self._parse_and_plan(ctx, losses, grad_scaler, grad_was_on)
        except Exception as exc:  # raised by agree, after the other processes heard of it
            error = exc
        if self._update_computer.agree(error, bool(ctx.bad)) and not ctx.bad:
            ctx.bad = ["a loss on another process"]  # all processes skip or raise together

    def _parse_and_plan(
        self, ctx: _StepContext, losses: object, grad_scaler: Any, grad_was_on: bool
    ) -> None:
        ctx.scaling = LossScaling.of(grad_scaler)
        batch = self._parse(losses, grad_was_on)
        check_not_stepped(batch)
        ctx.batch = batch = self._method_inputs(batch, ctx)  # [methods]
        ctx.record = StepRecord(names=batch.names, losses=batch.vector.detach().clone())
        self.last_record = ctx.record
        ctx.bad = nonfinite_loss_names(batch)
        cross = ctx.method.cross
        if cross is not None and not ctx.bad:  # [methods] the first of several batches
            ctx.bad = [f"{name} (batch 1)" for name in nonfinite_loss_names(cross.first)]
        if not ctx.bad:
            ctx.plan = self._plan(batch, ctx.record, ctx.method.features)

    @property
    def _jd_aggregator(self) -> Aggregator:
        """The aggregator of the Jacobian-descent step (a scalarizer never reaches it: it takes
        its own step, see :mod:`jdoptim.scalarized_step`)."""
        aggregator = self.aggregator
        assert isinstance(aggregator, Aggregator), "a scalarizer takes the scalarized step"
        return aggregator

    def _method_inputs(self, batch: LossBatch, ctx: _StepContext) -> LossBatch:
        """[methods] Parse ``extra_batches=`` and check ``features=`` against the method;
        returns the batch whose losses make the update (see :mod:`jdoptim.updates.cross_batch`)."""
        method = ctx.method
        method.cross = CrossBatches.parse(batch, method.extra_batches, self._jd_aggregator)
        check_method_step(
            self._jd_aggregator,
            self._update_computer,
            features=method.features,
            cross=method.cross,
            scaled=ctx.scaling is not None,
        )
        if method.cross is None:
            return batch
        for extra in (method.cross.second, method.cross.update):
            check_not_stepped(extra)
        return method.cross.update

    def _parse(self, losses: object, grad_was_on: bool) -> LossBatch:
        try:
            return parse_losses(losses, self._update_computer.max_loss_dim)
        except ValueError as error:
            if grad_was_on or "no autograd graph" not in str(error):
                raise
            raise ValueError(
                f"{error} This step was called under torch.no_grad() or torch.inference_mode(): "
                "compute the losses (the forward pass) outside that block; opt.step(losses) "
                "itself may run inside it."
            ) from error

    def _plan(
        self, batch: LossBatch, record: StepRecord, features: Tensor | None = None
    ) -> ParameterPlan:  # features=: one walk of the heads also gives the plan
        plan = plan_parameters(batch, self._owned_parameters(), self.scope, features)
        record.shared, record.specific = plan.shared, plan.specific
        record.foreign, record.unreached = plan.foreign, plan.unreached
        if not plan.shared and not plan.specific:
            raise ValueError(
                "The losses reach none of the wrapped optimizer's parameters: were they computed "
                "from another model, or are its parameters frozen? Give the optimizer the "
                "parameters the losses depend on."
            )
        return plan

    def _update(self, ctx: _StepContext) -> StepRecord:
        """The compute, check and apply phases; the aggregator's state is restored when the
        step is refused or skipped."""
        batch, record = ctx.parsed()
        ctx.snapshot = self._aggregator_snapshot()
        for consumed in ctx.method.batches(batch):  # from here, the losses' graph is consumed
            mark_stepped(consumed)
        watch = StrayGradientWatch(ctx.planned().unreached)
        try:
            result = self._compute(ctx)
            self._refuse_stray_gradients(watch)
        except NonFiniteJacobianError as error:
            self._restore_aggregator(ctx.snapshot)
            watch.restore()
            return self._refuse(
                record,
                f"{error} (the losses were finite): nothing was updated. This usually means "
                "an infinite derivative (e.g. sqrt or log at 0) or overflow; fix the loss, or "
                "pass nonfinite='skip' to skip such steps.",
            )
        except BaseException:
            self._restore_aggregator(ctx.snapshot)
            watch.restore()
            raise
        _record_result(record, result)
        problem = ctx.stepping().check(result)
        if problem:
            self._restore_aggregator(ctx.snapshot)
            return self._refuse(
                record,
                f"Non-finite {problem} (the losses were finite): nothing was updated. This "
                "usually means overflowing gradients; lower the learning rate or clip the "
                "losses, or pass nonfinite='skip' to skip such steps.",
            )
        self._apply(ctx, result)
        return record

    def _refuse_stray_gradients(self, watch: StrayGradientWatch) -> None:
        """Raise (the caller restores them) if the step's backward pass wrote into the ``.grad``
        of parameters the losses' graph does not reach (see :mod:`jdoptim.stray_gradients`)."""
        written = watch.written()
        if written:
            engine = getattr(self._update_computer, "engine", None)
            labels = getattr(engine, "parameter_labels", None)
            names = parameter_names(written, self.optimizer.param_groups, labels)
            raise RuntimeError(stray_gradients_message(names))

    def _compute(self, ctx: _StepContext) -> UpdateResult:
        """The compute phase: this step's update computer (the optimizer's own, or the route of
        ``features=`` / ``extra_batches=``, under the GradScaler's :class:`~jdoptim.updates.scaled.
        ScaledUpdate` when one is given) and its result; torch's graph-reuse errors become the
        library's."""
        (batch, _), plan, method = ctx.parsed(), ctx.planned(), ctx.method
        try:
            with no_autocast(batch.vector.device.type):
                prepared = prepare_method(  # [methods] bound inputs, W(J₁J₂ᵀ), features= route
                    self._jd_aggregator,
                    batch,
                    plan,
                    self._update_computer,
                    features=method.features,
                    cross=method.cross,
                    scaled=ctx.scaling is not None,
                )
                ctx.computer = computer = scaled(prepared.computer, ctx.scaling)
                return computer.compute(batch, plan, prepared.aggregator)
        except RuntimeError as error:
            stale = translate_graph_error(error)
            if stale is None:
                raise
            raise stale from error

    def _apply(self, ctx: _StepContext, result: UpdateResult) -> None:
        """The apply phase: accumulate the update into ``.grad`` and run the wrapped optimizer's
        step through the step's computer (``grad_scaler.step`` under a GradScaler, which may
        skip it: the aggregator's state is then restored)."""
        plan, (_, record) = ctx.planned(), ctx.parsed()
        self._accumulate(plan, result)
        if self.freeze_foreign:
            for leaf in plan.foreign:
                leaf.requires_grad_(False)
        params = list(plan.shared) + [p for p, _ in plan.specific]
        reason = ctx.stepping().step_optimizer(self.optimizer, params)
        if reason is not None:
            self._restore_aggregator(ctx.snapshot)  # a skipped step leaves the aggregator as well
            record.skipped, record.reason = True, reason

    # -- the aggregator's state around a refused step ---------------------------------------

    def _aggregator_snapshot(self) -> dict[str, Any] | None:
        """A copy of the aggregator's whole state (buffers and extra state: EMAs, counters,
        random generators), taken before each step when it holds any, so that a step refused
        or skipped after the aggregator ran leaves it exactly as it was (skipping a step and
        resuming is then the same as never having seen it).

        Design note: restoring a snapshot was preferred to checking everything before
        aggregating because the engine path gets the specific parameters' gradients (which may
        be non-finite while the Gramian is finite) from the same backward pass as the weighted
        update, i.e. after the weights; a snapshot is exact for every method, including a
        user's, and costs a copy of a few small tensors, only for stateful methods (none for
        UPGrad and the other stateless ones).
        """
        if not holds_state(self.aggregator):
            return None
        return copy.deepcopy(self.aggregator.state_dict())

    def _restore_aggregator(self, snapshot: dict[str, Any] | None) -> None:
        if snapshot is not None:
            self.aggregator.load_state_dict(snapshot)
            self._forget_aggregator_sync()

    def _forget_aggregator_sync(self) -> None:
        """A distributed update computer copies rank 0's aggregator state once: after a
        restore or a load, let it copy again at the next step."""
        self._update_computer.forget_aggregator_sync()

    # -- what a step says besides its update ------------------------------------------------

    def _note_idle_losses(self, record: StepRecord, batch: LossBatch, plan: ParameterPlan) -> None:
        if not plan.idle_losses:
            return
        record.idle_losses = tuple(batch.names[i] for i in plan.idle_losses)
        self._warn_once(
            "idle",
            f"{', '.join(record.idle_losses)} reach(es) none of the wrapped optimizer's "
            "parameters (only parameters it does not own, or none), so it cannot change this "
            "step's update. Give the optimizer the parameters it depends on, or leave it out of "
            "step(). (record.idle_losses lists such losses at each step; warned once.)",
        )

    def _warn_if_per_sample(self, batch: LossBatch) -> None:
        """``modules=`` without ``batch_dim`` and one 1-D tensor of losses, not stacked from
        scalars, with as many entries as the modules' last input had along its first dimension:
        likely per-sample losses, which the engine then treats as task losses (exact, but about
        twice slower than with ``batch_dim=0``)."""
        if not self._uses_engine or self.batch_dim is not None or batch.separate is not None:
            return
        if batch.shape is not None or batch.m < 2 or not batch.sources:
            return
        if batch.m not in self._batch_sizes.sizes.values():  # not one loss per input sample
            return
        node = batch.sources[0].grad_fn
        if node is not None and node.name() in ("StackBackward0", "CatBackward0"):
            return
        self._warn_once(
            "per-sample",
            f"JDOptimizer(modules=...) got one 1-D tensor of {batch.m} losses and no batch_dim, "
            "so the engine treats them as task losses. If they are per-sample losses (one per "
            "sample of the batch), pass batch_dim=0: the same step, about twice faster. If they "
            "are task losses, pass them as a list or dict to silence this warning.",
        )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=user_stacklevel())

    def _check_not_ddp(self) -> None:
        """Refuse a step without ``process_group`` on parameters a DDP model replicates."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            self._ddp_check_pending = False
            return
        from .distributed import find_ddp_model  # imported only in a distributed run

        owner = find_ddp_model(self._owned_parameters())
        if owner is not None and self._scalarized is not None:
            raise ValueError(
                f"The optimizer's parameters belong to a DistributedDataParallel model "
                f"({type(owner.module).__name__}) and torch.distributed runs "
                f"{dist.get_world_size()} processes, but a scalarizer's step takes its gradient "
                "with torch.autograd.grad, which DDP does not all-reduce: the replicas would "
                "drift apart. Scalarize the losses and call backward() with the plain optimizer "
                "under DDP, or pass process_group=False to step each process alone, on purpose."
            )
        if owner is not None:
            raise ValueError(
                f"The optimizer's parameters belong to a DistributedDataParallel model "
                f"({type(owner.module).__name__}) and torch.distributed runs "
                f"{dist.get_world_size()} processes, but this JDOptimizer has no process_group: "
                "each process would take its own JD step and the replicas would drift apart. "
                "Pass process_group=ddp_model for distributed JD (the step of one process on "
                "the whole batch), or process_group=False to run JD on each process alone, on "
                "purpose."
            )
        self._ddp_check_pending = False

    def _refuse(self, record: StepRecord, message: str) -> StepRecord:
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        record.skipped, record.reason = True, message
        return record

    @staticmethod
    def _accumulate(plan: ParameterPlan, result: UpdateResult) -> None:
        params = list(plan.shared) + [p for p, _ in plan.specific]
        grads = result.shared_grads + result.specific_grads
        # Stored without a copy where safe (jdoptim/grads.py): not a row of a Jacobian block.
        store_gradients(
            list(zip(params, grads)), reserved=(result.weights,), partitioned=result.partitioned
        )


@dataclass
class _MethodArgs:
    """[methods] A step's ``features=`` and ``extra_batches=`` (see :mod:`jdoptim.updates.method`),
    and the parsed batches of a cross-batch step."""

    features: Tensor | None = None
    extra_batches: Sequence[object] | None = None
    cross: CrossBatches | None = None

    def batches(self, batch: LossBatch) -> tuple[LossBatch, ...]:
        """Every batch whose graph the step consumes."""
        if self.cross is None:
            return (batch,)
        return (self.cross.first, self.cross.second, self.cross.update)


@dataclass
class _StepContext:
    """What the phases of one step hand on to the next (see :meth:`JDOptimizer._step`).

    Attributes:
        method: the step's ``features=`` / ``extra_batches=`` (``[methods]``).
        scaling: the GradScaler's loss scaling of this step, or ``None``.
        batch, record, plan: the parsed losses, the step's record, the parameter plan (set by
            the parse and plan phases; ``plan`` stays ``None`` when a loss is non-finite).
        bad: the names of the non-finite losses (on this process, or on another one).
        computer: this step's update computer (set by the compute phase).
        snapshot: the aggregator's state before the step (when it holds any).
    """

    method: _MethodArgs
    scaling: LossScaling | None = None
    batch: LossBatch | None = None
    record: StepRecord | None = None
    plan: ParameterPlan | None = None
    bad: list[str] = field(default_factory=list)
    computer: UpdateComputer | None = None
    snapshot: dict[str, Any] | None = None

    def parsed(self) -> tuple[LossBatch, StepRecord]:
        """The batch and the record (the parse phase sets them, or raises)."""
        assert self.batch is not None and self.record is not None, "before the parse phase"
        return self.batch, self.record

    def planned(self) -> ParameterPlan:
        """The parameter plan (the plan phase sets it when every loss is finite)."""
        assert self.plan is not None, "before the plan phase, or with a non-finite loss"
        return self.plan

    def stepping(self) -> UpdateComputer:
        """This step's update computer (the compute phase sets it)."""
        assert self.computer is not None, "before the compute phase"
        return self.computer


def _record_result(record: StepRecord, result: UpdateResult) -> None:
    """What the compute phase gives the record: weights, (unscaled) Gramian, statistics."""
    record.weights, record.gramian = result.weights, result.gramian
    record.communication = result.stats
    if result.stats is not None:  # the former untyped entries, kept for compatibility
        record.extras.update(result.stats.as_extras())
    record.extras.update(result.extras)


class _BatchSizes:
    """The first-dimension size of each watched module's first tensor input, at its last
    forward call (a forward pre-hook, removed when the optimizer is collected)."""

    def __init__(self) -> None:
        self.sizes: dict[int, int] = {}

    def watch(self, modules: nn.Module | Iterable[nn.Module], owner: object) -> None:
        module_list = [modules] if isinstance(modules, nn.Module) else list(modules)
        handles = [m.register_forward_pre_hook(self._record) for m in module_list]
        weakref.finalize(owner, _remove_handles, handles)

    def _record(self, module: nn.Module, args: tuple[object, ...]) -> None:
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if first is not None and first.dim() > 0:
            self.sizes[id(module)] = first.shape[0]


def _remove_handles(handles: list[Any]) -> None:
    for handle in handles:
        handle.remove()


def _check_options(optimizer: object, aggregator: object, scope: object, nonfinite: object) -> None:
    """Raises on a ``JDOptimizer`` argument it cannot take (before anything is built)."""
    if not isinstance(optimizer, Optimizer):
        raise TypeError(
            f"JDOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}: "
            "e.g. JDOptimizer(torch.optim.Adam(model.parameters()), UPGrad())."
        )
    if isinstance(optimizer, JDOptimizer):
        raise TypeError("This optimizer is already a JDOptimizer: do not wrap it twice.")
    _check_aggregator(aggregator)
    if scope not in ("shared", "all"):
        raise ValueError(f"scope must be 'shared' or 'all', got {scope!r}.")
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")


def _check_aggregator(aggregator: object) -> None:
    """Refuse what is not an :class:`Aggregator` or :class:`~jdoptim.scalarization.Scalarizer`
    instance, naming the fix."""
    if isinstance(aggregator, (Aggregator, Scalarizer)):
        return
    if isinstance(aggregator, type) and issubclass(aggregator, (Aggregator, Weighting, Scalarizer)):
        fix = (
            f"GramianWeightedAggregator({aggregator.__name__}())"
            if issubclass(aggregator, Weighting)
            else f"{aggregator.__name__}()"
        )
        raise TypeError(
            f"aggregator={aggregator.__name__} is a class: pass an instance, aggregator={fix}."
        )
    if isinstance(aggregator, str):
        match, module = _method_named(aggregator)
        example = f"{match}()" if match else "UPGrad()"
        raise TypeError(
            f"aggregator={aggregator!r} is a string: pass an instance, e.g. "
            f"aggregator={example} (from {module} import {example[:-2]})."
        )
    if isinstance(aggregator, Weighting):
        raise TypeError(
            f"aggregator must be an Aggregator, got the Weighting {type(aggregator).__name__}: "
            f"pass GramianWeightedAggregator({type(aggregator).__name__}(...))."
        )
    raise TypeError(
        f"aggregator must be a jdoptim.aggregation.Aggregator instance (e.g. UPGrad()) or a "
        f"jdoptim.scalarization.Scalarizer instance (e.g. UW(2)), got "
        f"{type(aggregator).__name__}."
    )


def _method_named(name: str) -> tuple[str | None, str]:
    """The aggregator or scalarizer whose name matches ``name`` (case, ``-`` and ``_`` aside),
    and its module; aggregators first (``Mean``, ``Sum``, … exist in both)."""
    from . import aggregation, scalarization

    key = name.replace("-", "").replace("_", "").lower()
    for module in (aggregation, scalarization):
        known = {entry.lower(): entry for entry in module.__all__}
        if key in known:
            return known[key], module.__name__
    return None, "jdoptim.aggregation"


def _check_aggregator_state(aggregator: nn.Module, ours: object) -> None:
    """Refuse, before loading anything, the aggregator state of another method."""
    if not isinstance(ours, dict) or "aggregator" not in ours:
        raise ValueError(
            f"state_dict()['{_STATE_KEY}'] must be a dict with an 'aggregator' entry, as "
            "JDOptimizer.state_dict() writes it; got something else. Nothing was loaded."
        )
    mine = type(aggregator).__qualname__
    theirs = ours.get("aggregator_class", mine)
    fix = (
        f"build the JDOptimizer with the checkpoint's method to resume the run, or drop the "
        f"checkpoint's '{_STATE_KEY}' entry (state.pop('{_STATE_KEY}')) to start the "
        "aggregator afresh. Nothing was loaded."
    )
    if theirs != mine:
        raise ValueError(
            f"This checkpoint holds the state of a {theirs} aggregator, but this JDOptimizer's "
            f"aggregator is a {mine}: {fix}"
        )
    expected, given = aggregator.state_dict(), ours["aggregator"]
    if not _same_entries(expected, given):
        raise ValueError(
            f"The checkpoint's aggregator state has the entries {sorted(given)}, but this "
            f"{mine} has {sorted(expected)} (another method, or another version of it): {fix}"
        )


def _same_entries(expected: dict[str, Any], given: object) -> bool:
    """The same keys, and the same keys inside dict-valued entries (a method's extra state)."""
    if not isinstance(given, dict) or set(expected) != set(given):
        return False
    return all(
        set(value) == set(given[key])
        for key, value in expected.items()
        if isinstance(value, dict) and isinstance(given[key], dict)
    )
