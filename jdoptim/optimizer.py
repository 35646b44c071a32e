"""JDOptimizer: Jacobian descent as a drop-in wrapper around any ``torch.optim`` optimizer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from .aggregation import Aggregator, UPGrad
from .amp import LossScaling, no_autocast, poison_grads, scaler_step
from .finite import all_finite, is_finite
from .losses import nonfinite_loss_names, parse_losses
from .method_step import (  # [methods] features=, extra_batches=
    CrossBatches,
    check_method_arguments,
    prepare_method,
)
from .parameter_plan import ParameterPlan, Scope, plan_parameters
from .record import StepRecord
from .scalarization import Scalarizer
from .scalarized_step import ScalarizedStep, make_scalarized_step
from .update import (
    JacobianUpdate,
    NonFiniteJacobianError,
    UpdateComputer,
    UpdateResult,
)

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
            scalarized loss; see :mod:`jdoptim.scalarized_step`).
        modules: modules to hook for the memory-efficient Gramian engine (see
            :mod:`jdoptim.autogram`); ``None`` computes the Jacobian with a batched backward.
        batch_dim: with ``modules``, the dimension of the losses that indexes independent samples.
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
            and the global batch is the concatenation of the shards.
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
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"JDOptimizer wraps a torch.optim.Optimizer, got {type(optimizer).__name__}: "
                "e.g. JDOptimizer(torch.optim.Adam(model.parameters()), UPGrad())."
            )
        if isinstance(optimizer, JDOptimizer):
            raise TypeError("This optimizer is already a JDOptimizer: do not wrap it twice.")
        if aggregator is None:
            aggregator = UPGrad()
        if not isinstance(aggregator, (Aggregator, Scalarizer)):
            raise TypeError(
                f"aggregator must be a jdoptim.aggregation.Aggregator (or a "
                f"jdoptim.scalarization.Scalarizer), got "
                f"{type(aggregator).__name__}. To use a Weighting W, pass "
                "GramianWeightedAggregator(W)."
            )
        if scope not in ("shared", "all"):
            raise ValueError(f"scope must be 'shared' or 'all', got {scope!r}.")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}.")

        # -- scalarizers (jdoptim.scalarization): their own step, in scalarized_step.py --------
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
        self._update_computer: UpdateComputer = self._make_update_computer(
            modules, batch_dim, process_group
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
    ) -> UpdateComputer:
        if process_group is not None:
            from .distributed import make_distributed_update  # imported only when used

            return make_distributed_update(process_group, modules, batch_dim)
        if modules is None:
            return JacobianUpdate()
        from .autogram import GramianUpdate  # the engine is imported only when used

        module_list = [modules] if isinstance(modules, nn.Module) else list(modules)
        return GramianUpdate(module_list, batch_dim=batch_dim)

    # -- the torch.optim surface, delegated to the wrapped optimizer --------------------------

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
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
        state[_STATE_KEY] = {"aggregator": self.aggregator.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        ours = state.pop(_STATE_KEY, None)
        if ours is not None:
            self.aggregator.load_state_dict(ours["aggregator"])
        self.optimizer.load_state_dict(state)

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

    def step(  # type: ignore[override]
        self,
        losses: object = None,
        closure: Callable[[], object] | None = None,
        *,
        grad_scaler: Any = None,
        features: Tensor | None = None,  # [methods] see jdoptim.features_step
        extra_batches: Sequence[object] | None = None,  # [methods] see jdoptim.cross_batch
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
                gradients (representation-level JD, see :mod:`jdoptim.features_step`).
            extra_batches: for methods that weigh the losses by ``J₁J₂ᵀ`` (MoDo, SDMGrad): one
                or two more batches of the same losses on independent data (see
                :mod:`jdoptim.cross_batch`).

        On bad input (no losses, non-tensors, non-scalar entries, losses without a graph or on
        different devices, losses reaching none of the optimizer's parameters, non-finite
        losses or weights) it raises before anything changes: parameters, ``.grad`` and the
        optimizer's state are as they were.
        """
        check_method_arguments(self._scalarized, features, extra_batches)  # [methods]
        if self._scalarized is not None:  # a scalarizer: one backward (scalarized_step.py)
            self.last_record = self._scalarized.step(losses, closure, grad_scaler, self.nonfinite)
            return self.last_record
        if closure is not None:
            if losses is not None:
                raise TypeError("Pass either losses or a closure to step(), not both.")
            with torch.enable_grad():
                losses = closure()
        if losses is None:
            raise TypeError(
                "JDOptimizer.step() needs the losses: call opt.step([loss1, loss2, ...]) instead "
                "of backward() + step()."
            )
        batch = parse_losses(losses, getattr(self._update_computer, "max_loss_dim", 1))
        cross = CrossBatches.parse(batch, extra_batches, self.aggregator)  # [methods]
        batch = batch if cross is None else cross.update  # [methods] the batch that updates
        scaling = LossScaling.of(grad_scaler)
        record = StepRecord(names=batch.names, losses=batch.vector.detach().clone())
        self.last_record = record

        bad = nonfinite_loss_names(batch)
        any_process = getattr(self._update_computer, "any_process", None)
        if any_process is not None and any_process(bool(bad)) and not bad:
            bad = ["a loss on another process"]  # all processes skip or raise together
        if bad:
            return self._refuse(
                record,
                f"Non-finite loss value in {', '.join(bad)}: nothing was updated. Check the data "
                "and the learning rate, or pass nonfinite='skip' to skip such steps.",
            )

        plan = plan_parameters(batch, self._owned_parameters(), self.scope)
        record.shared, record.specific = plan.shared, plan.specific
        record.foreign, record.unreached = plan.foreign, plan.unreached
        if not plan.shared and not plan.specific:
            raise ValueError(
                "The losses reach none of the wrapped optimizer's parameters: were they computed "
                "from another model, or are its parameters frozen? Give the optimizer the "
                "parameters the losses depend on."
            )

        method = prepare_method(  # [methods] bound inputs, W(J₁J₂ᵀ), features= route
            self.aggregator, batch, plan, self._update_computer, features=features,
            cross=cross, scaled=scaling is not None,
        )
        computed_batch, aggregator = batch, method.aggregator
        if scaling is not None:
            computed_batch, aggregator = scaling.scale_batch(batch), scaling.wrap(aggregator)
        params = list(plan.shared) + [p for p, _ in plan.specific]
        try:
            with no_autocast(batch.vector.device.type):
                result = method.computer.compute(computed_batch, plan, aggregator)
        except NonFiniteJacobianError as error:
            if scaling is not None:  # the scaled backward overflowed: the scaler skips the step
                poison_grads(params)
                scaler_step(grad_scaler, self.optimizer, params)
                record.skipped, record.reason = True, f"GradScaler skipped the step: {error}."
                return record
            return self._refuse(
                record,
                f"{error} (the losses were finite): nothing was updated. This usually means "
                "an infinite derivative (e.g. sqrt or log at 0) or overflow; fix the loss, or "
                "pass nonfinite='skip' to skip such steps.",
            )
        record.weights, record.gramian = result.weights, result.gramian
        if scaling is not None:
            record.gramian = scaling.unscale_gramian(result.gramian)
        record.extras.update(result.extras)
        problem = _nonfinite_result(result)
        if problem and scaling is None:
            return self._refuse(
                record,
                f"Non-finite {problem} (the losses were finite): nothing was updated. This "
                "usually means overflowing gradients; lower the learning rate or clip the "
                "losses, or pass nonfinite='skip' to skip such steps.",
            )

        self._accumulate(plan, result)
        if self.freeze_foreign:
            for leaf in plan.foreign:
                leaf.requires_grad_(False)
        if scaling is None:
            self.optimizer.step()
        elif scaler_step(grad_scaler, self.optimizer, params):
            record.skipped, record.reason = True, "GradScaler skipped the step: inf/NaN update."
        return record

    def end_epoch(self) -> None:
        """Close a training epoch, for methods that count epochs (:class:`~jdoptim.
        scalarization.DWA` rolls its loss history); a no-op for the others."""
        if self._scalarized is not None:  # jdoptim.scalarization (scalarized_step.py)
            self._scalarized.end_epoch()

    def _refuse(self, record: StepRecord, message: str) -> StepRecord:
        if self.nonfinite == "raise":
            raise FloatingPointError(message)
        record.skipped, record.reason = True, message
        return record

    @staticmethod
    def _accumulate(plan: ParameterPlan, result: UpdateResult) -> None:
        params = list(plan.shared) + [p for p, _ in plan.specific]
        grads = result.shared_grads + result.specific_grads
        with torch.no_grad():
            for param, grad in zip(params, grads):
                if grad.dtype != param.dtype:
                    grad = grad.to(dtype=param.dtype)
                if param.grad is None:
                    # A view would keep its whole Jacobian block alive as long as the .grad.
                    param.grad = grad.clone() if grad._base is not None else grad
                else:
                    param.grad.add_(grad)


def _nonfinite_result(result: UpdateResult) -> str | None:
    """Name what is non-finite in ``result``, or ``None``.

    When the Gramian and the weights are finite, so are the shared gradients ``wᵀJ_p``: a
    non-finite entry of ``J`` makes a diagonal entry ``G_ii = ‖J_i‖²`` non-finite. Every update
    computer refuses a non-finite Gramian before weighting it (:func:`~jdoptim.update.
    gramian_weights`), so with weights, only the specific gradients, which ``G`` does not cover,
    are checked entry by entry; this keeps the check off the per-parameter hot path.
    """
    if result.weights is not None and not is_finite(result.weights):
        return "aggregation weights"
    covered = result.weights is not None and result.gramian is not None
    grads = result.specific_grads if covered else result.shared_grads + result.specific_grads
    if grads and not all_finite(grads):
        return "aggregated gradient"
    return None
