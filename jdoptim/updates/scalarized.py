r"""The step of ``JDOptimizer(opt, scalarizer)``: loss-only methods at the cost of one backward.

For a scalarizer ``S`` (:mod:`jdoptim.scalarization`) and the losses ``ℓ ∈ R^m``, the step

1. evaluates ``s = S(ℓ)`` on the losses and runs one backward of ``s`` through the model (with
   ``torch.autograd.grad``, at the cost of one plain backward), which gives the model's gradient,
   the learnable parameters' gradients and, caught at ``ℓ`` on the way, the *effective weights*
   ``wᵢ = ∂s/∂ℓᵢ``: by the chain rule the model's gradient is ``Σᵢ wᵢ ∂ℓᵢ/∂θ``. (Under loss
   scaling, ``w`` is computed first on a detached copy of ``ℓ``, and the backward of
   ``Σᵢ wᵢ ℓᵢ`` takes it scaled, so that an overflow reaches the grad scaler.) A method with a
   closed form (:meth:`~jdoptim.scalarization.Scalarizer._value_and_weights`: FAMO, COSMOS,
   STCH, PBI, GeometricMean, UW, IMTLL) gives ``s``, ``w`` and its learnable parameters'
   gradients directly, computed in Python floats for up to 64 losses, and the backward is that
   of ``Σᵢ wᵢ ℓᵢ``: the method adds no autograd node, and its few operations on ``m`` numbers no
   tensor operation each (see ``benchmarks/RESULTS.md``, loss-only methods);
2. checks that the weights and the gradients are finite, then (and only then) changes state:
   the scalarizer records the call, the gradients accumulate into ``.grad`` and the wrapped
   optimizer steps. A refused step (bad input, non-finite values) changes nothing.

Each gradient goes to the owned parameters the losses reach; parameters of other optimizers
(*foreign*) and unreached ones keep their ``.grad``, as in a JD step. ``StepRecord.weights`` are
the effective weights ``w`` and ``StepRecord.extras["scalarized_loss"]`` is ``s``.

The methods' machinery:

* **Learnable parameters** (:class:`~jdoptim.scalarization.UW`'s and
  :class:`~jdoptim.scalarization.IMTLL`'s log-scales): unless the wrapped optimizer already holds
  them, they are added to it at construction as one new parameter group, with the optimizer's
  defaults and ``weight_decay = 0`` (the papers train them jointly with the model, undecayed).
  Their optimizer state is then in the wrapped optimizer's ``state_dict()``. An LR scheduler
  built *before* would not schedule that group, so that case is refused: build it after.
* **FAMO**: given ``closure``, the losses are recomputed (under ``no_grad``) on the same batch after
  the model step and ``FAMO.update`` runs — the paper's Algorithm 2, one extra forward. Given the
  losses, the update waits for the next step and uses its losses, before they are scalarized: no
  extra forward, but the change it measures also holds the change of batch.
* **DWA**: ``opt.end_epoch()`` closes an epoch (or ``DWA(window=n)`` closes one every ``n`` steps).
* **STCH** (``warmup_steps=k``): the first ``k`` steps are linear and estimate the ideal point.
* **Checkpoints**: the scalarizer's state (parameters, FAMO's Adam, DWA's averages, STCH's warm-up,
  Random's generator) is in ``opt.state_dict()["jdoptim"]``; a restored checkpoint resumes the
  identical trajectory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..amp import LossScaling, no_autocast, scaler_step
from ..grads import store_gradients
from ..linalg.finite import all_finite, is_finite
from ..losses import (
    LossBatch,
    check_not_stepped,
    mark_stepped,
    nonfinite_loss_names,
    parse_losses,
    translate_graph_error,
)
from ..record import StepRecord
from ..scalarization import FAMO, Scalarizer, _floats

__all__ = ["ScalarizedStep", "attach_learnable_parameters", "make_scalarized_step"]

#: ``s``, ``w = ∂s/∂ℓ`` and the (learnable parameter, gradient) pairs of a step.
_ClosedForm = tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]


def make_scalarized_step(
    optimizer: Optimizer,
    method: object,
    batch_dim: int | None,
    freeze_foreign: bool,
    process_group: object,
) -> ScalarizedStep | None:
    """The step of ``JDOptimizer(optimizer, method)`` when ``method`` is a scalarizer (else
    ``None``), after refusing the options that have no meaning for one backward of a scalar.
    ``modules`` is accepted and unused (no hooks are installed): nothing depends on it."""
    if not isinstance(method, Scalarizer):
        return None
    name = type(method).__name__
    if process_group not in (None, False):  # False: each process alone, on purpose
        raise ValueError(
            f"process_group is not supported with a scalarizer ({name}): its state (e.g. loss "
            "averages, logits) would differ between processes. Wrap the model in "
            "DistributedDataParallel and scalarize the all-reduced losses yourself."
        )
    if batch_dim is not None:
        raise ValueError(
            f"batch_dim is for per-sample losses in the Gramian engine; a scalarizer ({name}) "
            "combines task losses: reduce each task's loss over the batch and drop batch_dim."
        )
    if freeze_foreign:
        raise ValueError(
            f"freeze_foreign needs the graph walk of a Jacobian step, which a scalarizer ({name}) "
            "does not do: drop freeze_foreign (foreign parameters are never updated anyway)."
        )
    return ScalarizedStep(optimizer, method)


def attach_learnable_parameters(optimizer: Optimizer, scalarizer: Scalarizer) -> None:
    """Add the scalarizer's learnable parameters to ``optimizer`` as a new parameter group,
    unless it already holds them (see the module docstring)."""
    learned = scalarizer.learnable_parameters()
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [p for p in learned if id(p) not in owned]
    name = type(scalarizer).__name__
    if not missing:
        return
    if len(missing) < len(learned):
        raise ValueError(
            f"The optimizer holds some of {name}'s learnable parameters but not all: give it "
            f"all of {name}.parameters(), or none (JDOptimizer then adds them as a group)."
        )
    if any("initial_lr" in group for group in optimizer.param_groups):
        raise ValueError(
            f"{name} has learnable parameters, which JDOptimizer adds to the optimizer as a new "
            "parameter group, but an LR scheduler already built on this optimizer would not "
            "schedule that group: build the scheduler after JDOptimizer, or give the optimizer "
            f"the parameters yourself, e.g. Adam([*model.parameters(), *{name.lower()}"
            ".parameters()])."
        )
    group: dict[str, Any] = {"params": missing}
    if "weight_decay" in optimizer.defaults:
        group["weight_decay"] = 0.0
    optimizer.add_param_group(group)


def _detached_vector(losses: object, m: int) -> Tensor:
    """The losses a closure returned, as a detached 1-D tensor of ``m`` values."""
    if isinstance(losses, Tensor):
        vector = losses.detach().reshape(-1)
    elif isinstance(losses, Mapping):
        vector = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in losses.values()])
    else:
        vector = torch.stack([torch.as_tensor(v).detach().reshape(()) for v in losses])  # type: ignore[attr-defined]
    if vector.numel() != m:
        raise ValueError(
            f"The closure returned {vector.numel()} losses after the step, but {m} before it: "
            "it must compute the same losses each time."
        )
    return vector


class ScalarizedStep:
    """Runs ``JDOptimizer.step`` for a scalarizer (see the module docstring)."""

    def __init__(self, optimizer: Optimizer, scalarizer: Scalarizer) -> None:
        attach_learnable_parameters(optimizer, scalarizer)
        self.optimizer = optimizer
        self.scalarizer = scalarizer

    def end_epoch(self) -> None:
        self.scalarizer.end_epoch()

    def step(
        self,
        losses: object,
        closure: Callable[[], object] | None,
        grad_scaler: Any,
        nonfinite: str,
        parse: Callable[[object], LossBatch] = parse_losses,
    ) -> StepRecord:
        """One step (see the module docstring); ``parse`` turns ``losses`` into a
        :class:`~jdoptim.losses.LossBatch` (``JDOptimizer`` passes its own, whose errors say
        what to do under ``no_grad``)."""
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
        batch = parse(losses)
        check_not_stepped(batch)  # a graph already consumed by a step: StaleGraphError
        record = StepRecord(names=batch.names, losses=batch.vector.detach().clone())
        bad = nonfinite_loss_names(batch)
        if bad:
            message = (
                f"Non-finite loss value in {', '.join(bad)}: nothing was updated. Check the data "
                "and the learning rate, or pass nonfinite='skip' to skip such steps."
            )
            return _refuse(record, message, nonfinite)
        self.scalarizer._check(record.losses)
        scaling = LossScaling.of(grad_scaler)
        restore = self._famo_catch_up(record.losses)
        try:
            grads = self._gradients(batch, record, scaling)
        except BaseException:
            restore()
            raise
        if isinstance(grads, str):
            restore()
            return _refuse(record, grads, nonfinite)
        self._apply(record, grads, grad_scaler if scaling is not None else None)
        if closure is not None and isinstance(self.scalarizer, FAMO):
            self._famo_same_batch_update(closure, record, nonfinite)
        return record

    def _gradients(
        self, batch: LossBatch, record: StepRecord, scaling: LossScaling | None
    ) -> list[tuple[Tensor, Tensor]] | str:
        """The (parameter, gradient) pairs of the step, or why it is refused; changes nothing.

        Without loss scaling this is one backward of ``s = S(ℓ)`` through the model, which also
        yields ``w = ∂s/∂ℓ`` (``ℓ``'s gradient, caught on the way) and the learnable parameters'
        gradients; the chain rule makes the model's part ``Σᵢ wᵢ ∂ℓᵢ/∂θ``. Under loss scaling
        the weights are computed first, on a detached copy of the losses, and the model's
        backward takes them scaled (a scaled weight may overflow in the losses' dtype, which the
        grad scaler, not this step, must see)."""
        learned = self.scalarizer.learnable_parameters()
        own = {id(p) for p in learned}  # the optimizer may hold them too: one gradient each
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        params = [p for p in params if p.requires_grad and id(p) not in own]
        closed = self._closed_form(record.losses, learned)
        if scaling is not None:  # the gradients of the scaled loss; the scaler unscales them
            factor = float(scaling.grad_scaler.scale(torch.ones((), device=batch.vector.device)))
            return self._gradients_of_weights(batch, record, params, learned, factor, closed)
        if closed is not None:  # w in closed form: one backward of Σ wᵢ ℓᵢ, no method nodes
            return self._gradients_of_weights(batch, record, params, learned, 1.0, closed)
        with torch.enable_grad(), no_autocast(batch.vector.device.type):
            scalar = self.scalarizer._scalarize(batch.vector)
        if not scalar.requires_grad:  # s ignores the losses: a zero step, as the other route
            return self._gradients_of_weights(batch, record, params, learned, 1.0)
        mark_stepped(batch)  # from here on, the losses' graph is consumed
        grads = _grad(scalar, [batch.vector, *params, *learned], None)
        weights = torch.zeros_like(record.losses) if grads[0] is None else grads[0]
        record.weights, record.extras["scalarized_loss"] = weights, scalar.detach()
        model, learned_grads = grads[1 : 1 + len(params)], grads[1 + len(params) :]
        return self._checked_pairs(
            record, (weights, scalar.detach()), zip(params, model), zip(learned, learned_grads)
        )

    def _gradients_of_weights(
        self,
        batch: LossBatch,
        record: StepRecord,
        params: list[Tensor],
        learned: list[nn.Parameter],
        factor: float,
        closed: _ClosedForm | None = None,
    ) -> list[tuple[Tensor, Tensor]] | str:
        """The two-pass route: ``w`` from the scalarizer on a detached copy of the losses (or
        ``closed``, the method's closed form), then the model's backward of
        ``Σᵢ factor·wᵢ ℓᵢ``."""
        if closed is not None:
            scalar, weights, learned_pairs = closed
        else:
            scalar, weights, learned_pairs = self._effective_weights(record.losses)
        record.weights, record.extras["scalarized_loss"] = weights, scalar
        # Autograd's weights, and any under loss scaling, are checked before the backward that
        # needs them; an unscaled closed form's with the gradients (as on the one-backward
        # route: a refused step then has consumed the losses' graph, and changed nothing else).
        early = closed is None or factor != 1.0
        if early and not is_finite(torch.cat([weights.reshape(-1), scalar.reshape(1)])):
            return self._nonfinite_weights_message(record)
        outputs = weights.to(batch.vector.dtype)
        if factor != 1.0:
            outputs = outputs * factor
        mark_stepped(batch)  # from here on, the losses' graph is consumed
        model = _grad(batch.vector, params, outputs)
        held = {id(p): g for p, g in learned_pairs}
        learned_grads = [held.get(id(p)) for p in learned]
        if factor != 1.0:
            learned_grads = [None if g is None else g * factor for g in learned_grads]
        checked = (weights, scalar) if factor == 1.0 else None  # else the grad scaler checks
        return self._checked_pairs(record, checked, zip(params, model), zip(learned, learned_grads))

    def _checked_pairs(
        self,
        record: StepRecord,
        checked: tuple[Tensor, Tensor] | None,
        model: Iterable[tuple[Tensor, Tensor | None]],
        learned: Iterable[tuple[Tensor, Tensor | None]],
    ) -> list[tuple[Tensor, Tensor]] | str:
        """The (parameter, gradient) pairs, refused when no model parameter was reached or when
        the ``checked`` weights and scalarized loss, or a gradient, are not finite (one
        synchronisation for all)."""
        pairs = [(p, g) for p, g in model if g is not None]
        if not pairs:
            raise ValueError(
                "The losses reach none of the wrapped optimizer's parameters: were they computed "
                "from another model, or are its parameters frozen? Give the optimizer the "
                "parameters the losses depend on."
            )
        pairs += [(p, g) for p, g in learned if g is not None]
        if checked is None:
            return pairs
        weights, scalar = checked[0].reshape(-1), checked[1].reshape(1)
        if all_finite([weights, scalar, *(g for _, g in pairs)]):
            return pairs
        if not is_finite(torch.cat([weights, scalar])):
            return self._nonfinite_weights_message(record)
        return (
            "Non-finite gradient of the scalarized loss (the losses were finite): nothing was "
            "updated. This usually means an infinite derivative (e.g. sqrt or log at 0) or "
            "overflow; fix the loss, or pass nonfinite='skip' to skip such steps."
        )

    def _nonfinite_weights_message(self, record: StepRecord) -> str:
        return (
            f"Non-finite effective weight or scalarized loss ({type(self.scalarizer).__name__}"
            f" of losses {record.losses.tolist()}): nothing was updated. A loss may be at a "
            "point where the method is undefined (e.g. 0 for GeometricMean)."
        )

    def _closed_form(self, values: Tensor, learned: list[nn.Parameter]) -> _ClosedForm | None:
        """``s``, ``w`` and the learnable parameters' gradients from the method's closed forms
        (:meth:`~jdoptim.scalarization.Scalarizer._value_and_weights`,
        :meth:`~jdoptim.scalarization.Scalarizer._learned_gradients`), or ``None`` (no closed
        form, more than :data:`~jdoptim.scalarization._floats.FLOAT_LIMIT` losses, for which
        its arithmetic in Python floats would cost more than autograd's, or one whose floats
        overflowed: autograd's route then gives the IEEE result, whose infinite weights are
        refused by name)."""
        if values.numel() > _floats.FLOAT_LIMIT:
            return None
        try:
            closed = self.scalarizer._value_and_weights(values)
            grads = self.scalarizer._learned_gradients(values) if closed and learned else []
        except ArithmeticError:  # a float overflow (e.g. exp): autograd's IEEE inf, refused
            return None
        if closed is None or grads is None:
            return None
        return closed[0], closed[1], list(zip(learned, grads))

    def _effective_weights(
        self, values: Tensor
    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
        """``s = S(ℓ)``, ``w = ∂s/∂ℓ`` and the learnable parameters' gradients, from the
        scalarizer's side effect-free evaluation on a detached copy of the losses."""
        leaf = values.detach().requires_grad_()
        learned = self.scalarizer.learnable_parameters()
        with torch.enable_grad(), no_autocast(values.device.type):
            scalar = self.scalarizer._scalarize(leaf)
            if not scalar.requires_grad:
                return scalar.detach(), torch.zeros_like(values), []
            grads = torch.autograd.grad(scalar, [leaf, *learned], allow_unused=True)
        weights = torch.zeros_like(values) if grads[0] is None else grads[0]
        pairs: list[tuple[Tensor, Tensor]] = [
            (p, g) for p, g in zip(learned, grads[1:]) if g is not None
        ]
        return scalar.detach(), weights, pairs

    def _apply(
        self, record: StepRecord, pairs: list[tuple[Tensor, Tensor]], grad_scaler: Any
    ) -> None:
        """Commit the step: the scalarizer records the call, ``.grad`` accumulates (the computed
        gradients are stored without a copy where that is safe, as ``backward()`` does; the
        weights, which were the backward's output gradient, are kept out of ``.grad``), the
        wrapped optimizer (or the grad scaler) steps."""
        self.scalarizer._observe(record.losses)
        store_gradients(pairs, reserved=(record.weights,))
        if grad_scaler is None:
            self.optimizer.step()
        elif scaler_step(grad_scaler, self.optimizer, [p for p, _ in pairs]):
            record.skipped, record.reason = True, "GradScaler skipped the step: inf/NaN update."

    def _famo_catch_up(self, values: Tensor) -> Callable[[], None]:
        """FAMO's deferred logit update from the previous step, with these losses as the losses
        after that step; returns how to undo it if this step is refused."""
        famo = self.scalarizer
        if not isinstance(famo, FAMO) or not famo.pending_update:
            return lambda: None
        return famo._apply_update(values)  # the values passed famo._check

    def _famo_same_batch_update(
        self, closure: Callable[[], object], record: StepRecord, nonfinite: str
    ) -> None:
        """FAMO's update from the losses recomputed by ``closure`` after the model step."""
        famo = self.scalarizer
        assert isinstance(famo, FAMO)
        with torch.no_grad():
            after = _detached_vector(closure(), record.losses.numel())
        if is_finite(after):
            famo.update(after.to(record.losses.device))
            return
        message = (
            "The losses recomputed after the step are not finite: the model step was taken but "
            "FAMO's logits were not updated (the next step's losses will update them)."
        )
        if nonfinite == "raise":
            raise FloatingPointError(message)
        record.extras["famo_update"] = message


def _grad(
    output: Tensor, inputs: list[Tensor], grad_output: Tensor | None
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad`` (unused inputs give ``None``), with torch's graph-reuse errors
    turned into the library's."""
    try:
        return torch.autograd.grad(output, inputs, grad_outputs=grad_output, allow_unused=True)
    except RuntimeError as error:
        stale = translate_graph_error(error)
        if stale is None:
            raise
        raise stale from error


def _refuse(record: StepRecord, message: str, nonfinite: str) -> StepRecord:
    if nonfinite == "raise":
        raise FloatingPointError(message)
    record.skipped, record.reason = True, message
    return record
