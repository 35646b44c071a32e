r"""Mixed precision: ``torch.autocast`` and ``torch.amp.GradScaler`` with :class:`JDOptimizer`.

**autocast** needs nothing special: compute the losses under ``torch.autocast(...)`` and call
``opt.step(losses)`` after the block, as you would call ``backward()``. The step itself runs with
autocast disabled (the Gramian and the weights are computed in the parameters' precision).

**GradScaler** (float16 on CUDA): pass the scaler to the step, and call ``scaler.update()`` after
it, as usual::

    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        losses = compute_losses(model, batch)
    opt.zero_grad()
    record = opt.step(losses, grad_scaler=scaler)   # instead of scaler.scale(loss).backward();
    scaler.update()                                  #            scaler.step(opt)

One scaled step, with ``s = scaler.get_scale()``:

1. the Jacobian is computed from the *scaled* losses ``s·ℓᵢ`` (so that small float16 gradients do
   not underflow in the backward pass);
2. the aggregator sees the *unscaled* Gramian ``G / s²`` (or Jacobian ``J / s``), so methods that
   are not scale-invariant (Nash-MTL, CAGrad, ...) behave exactly as without scaling; if it holds
   an inf or NaN, the aggregator is not called and the update is made of NaNs;
3. the update, still multiplied by ``s``, is accumulated into ``.grad`` as ``scaler.scale(loss)
   .backward()`` would have, and ``scaler.step(optimizer)`` unscales it, checks it for inf/NaN and
   skips the wrapped optimizer's step on overflow, exactly as it does for a plain optimizer; the
   record then says ``skipped=True``. ``scaler.update()`` lowers the scale after such a step.

The Gramian of the scaled losses is ``s² G``: in float32 it overflows once ``s·‖gᵢ‖`` passes about
``1.8e19``, before the scaled gradients do. Such a step counts as an overflow (skipped, and the
scaler lowers ``s``), so the scale settles somewhat lower than with a plain backward; the default
``init_scale=2**16`` is far from that limit. The record's ``gramian`` and ``weights`` are the
unscaled ones. Step pre-hooks on the wrapped
optimizer (e.g. gradient clipping) run after the unscaling, as the GradScaler recipe asks.

**Design: the scaling is a wrapper of the update computer.** ``JDOptimizer.step`` builds one
:class:`ScaledUpdate` per step around the step's update computer (the optimizer's own, local or
distributed, or the route of ``features=``) when a scaler is given, and otherwise runs that
computer as it is; no phase of the step branches on the scaler. The wrapper overrides three
members of :class:`~jdoptim.update.UpdateComputer`:

* ``compute`` scales the losses (:meth:`LossScaling.scale_batch`), gives the inner computer an
  aggregator that unscales its input (:meth:`LossScaling.wrap`), and unscales the result's
  Gramian. A non-finite Gramian or Jacobian (the scaled backward overflowed) is not an error
  here: the result is an update of NaNs, which the scaler will find;
* ``check`` refuses nothing: inf/NaN is the scaler's business (it skips the wrapped step);
* ``step_optimizer`` runs ``grad_scaler.step(optimizer)`` and says whether it skipped it.

The step then restores the aggregator's state after a skipped step, as after a refused one. The
agreement between processes, ``max_loss_dim`` and ``distributed`` are the inner computer's. The
scalarizers' step (:mod:`jdoptim.scalarized_step`) uses :class:`LossScaling` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .aggregation import Aggregator, GramianWeightedAggregator, Weighting
from .linalg.finite import all_finite
from .losses import LossBatch
from .parameter_plan import ParameterPlan
from .update import NonFiniteJacobianError, UpdateComputer, UpdateResult

__all__ = [
    "LossScaling",
    "ScaledUpdate",
    "no_autocast",
    "poison_grads",
    "scaled",
    "scaler_step",
]


@runtime_checkable
class GradScalerLike(Protocol):
    """What a step uses of a ``torch.amp.GradScaler``."""

    def scale(self, outputs: Any) -> Any: ...

    def get_scale(self) -> float: ...

    def step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any: ...

    def is_enabled(self) -> bool: ...


def _as_scaler(grad_scaler: object) -> GradScalerLike:
    """``grad_scaler`` if it has a GradScaler's methods, else a ``TypeError`` that says so."""
    if not isinstance(grad_scaler, GradScalerLike):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
        )
    return grad_scaler


class LossScaling:
    """The loss scaling of one step by a ``GradScaler``; see the module docstring.

    :meth:`scale_batch` scales the losses with ``grad_scaler.scale`` (which also initialises the
    scaler on its first use) and fixes the scale ``s`` of this step; :meth:`wrap` and
    :meth:`unscale_gramian` then undo it.
    """

    def __init__(self, grad_scaler: GradScalerLike) -> None:
        self.grad_scaler = grad_scaler
        self.scale: float | None = None

    @classmethod
    def of(cls, grad_scaler: object | None) -> LossScaling | None:
        """The scaling of ``grad_scaler``, or ``None`` when it is absent or disabled."""
        if grad_scaler is None:
            return None
        scaler = _as_scaler(grad_scaler)
        if not scaler.is_enabled():
            return None
        return cls(scaler)

    def scale_batch(self, batch: LossBatch) -> LossBatch:
        """The same losses multiplied by the scale (the graph goes through the product)."""
        vector = self.grad_scaler.scale(batch.vector)
        separate = None
        if batch.separate is not None:
            separate = tuple(self.grad_scaler.scale(loss) for loss in batch.separate)
        self.scale = float(self.grad_scaler.get_scale())
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"The loss scale must be finite and positive, got {self.scale!r}.")
        return dataclasses.replace(batch, vector=vector, separate=separate)

    def wrap(self, aggregator: Aggregator) -> Aggregator:
        """An aggregator that takes scaled input and aggregates its unscaled version."""
        scale = self._fixed_scale()
        if isinstance(aggregator, GramianWeightedAggregator):
            return GramianWeightedAggregator(_UnscaledWeighting(aggregator.weighting, scale))
        return _UnscaledAggregator(aggregator, scale)

    def unscale_gramian(self, gramian: Tensor | None) -> Tensor | None:
        return None if gramian is None else gramian / self._fixed_scale() ** 2

    def _fixed_scale(self) -> float:
        if self.scale is None:
            raise RuntimeError("LossScaling.scale_batch must be called first.")
        return self.scale


class _UnscaledWeighting(Weighting):
    """``w = W(G / s²)``. A non-finite ``G`` never gets here: the update computers refuse it
    first (:func:`jdoptim.update.gramian_weights`), and the step lets the scaler skip."""

    def __init__(self, inner: Weighting, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, gramian: Tensor) -> Tensor:
        return self.inner(gramian / self.scale**2)


class _UnscaledAggregator(Aggregator):
    """``d = s · A(J / s)``. A non-finite ``J`` is refused before (see ``_UnscaledWeighting``)."""

    def __init__(self, inner: Aggregator, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, matrix: Tensor) -> Tensor:
        return self.inner(matrix / self.scale) * self.scale


class ScaledUpdate(UpdateComputer):
    """An update computer under a ``GradScaler``, for one step (see the module docstring).

    Args:
        inner: the update computer of the step, which sees the scaled losses.
        scaling: the step's :class:`LossScaling` (its scale is fixed by :meth:`compute`).
    """

    def __init__(self, inner: UpdateComputer, scaling: LossScaling) -> None:
        self.inner = inner
        self.scaling = scaling
        self.overflow: str | None = None  # why the scaled backward gave no finite update

    # The wrapper's max_loss_dim and distributed are the inner computer's (read and written).
    @property
    def max_loss_dim(self) -> int:
        return self.inner.max_loss_dim

    @max_loss_dim.setter
    def max_loss_dim(self, value: int) -> None:
        self.inner.max_loss_dim = value

    @property
    def distributed(self) -> bool:
        return self.inner.distributed

    @distributed.setter
    def distributed(self, value: bool) -> None:
        self.inner.distributed = value

    def agree(self, error: BaseException | None, nonfinite: bool) -> bool:
        return self.inner.agree(error, nonfinite)

    def forget_aggregator_sync(self) -> None:
        self.inner.forget_aggregator_sync()

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        """The inner result on ``s·ℓ`` with the aggregator seeing ``G / s²`` (or ``J / s``); the
        returned Gramian is unscaled. On overflow, NaN gradients and no weights or Gramian."""
        scaled_batch = self.scaling.scale_batch(batch)
        try:
            result = self.inner.compute(scaled_batch, plan, self.scaling.wrap(aggregator))
        except NonFiniteJacobianError as error:
            self.overflow = str(error)
            return _overflowed(plan)
        result.gramian = self.scaling.unscale_gramian(result.gramian)
        return result

    def check(self, result: UpdateResult) -> str | None:
        """Nothing is refused: ``grad_scaler.step`` finds inf/NaN in ``.grad`` and skips."""
        return None

    def step_optimizer(self, optimizer: Optimizer, params: list[Tensor]) -> str | None:
        """``grad_scaler.step(optimizer)``; the reason when it skipped the step."""
        if not scaler_step(self.scaling.grad_scaler, optimizer, params):
            return None
        if self.overflow is not None:
            return f"GradScaler skipped the step: {self.overflow}."
        return "GradScaler skipped the step: inf/NaN update."


def scaled(computer: UpdateComputer, scaling: LossScaling | None) -> UpdateComputer:
    """``computer`` under the step's loss scaling, or itself when there is none."""
    return computer if scaling is None else ScaledUpdate(computer, scaling)


def _overflowed(plan: ParameterPlan) -> UpdateResult:
    """The update of an overflowed scaled backward: NaN for every reached parameter, so that
    the scaler records the overflow, skips the step and lowers the scale."""
    with torch.no_grad():
        shared = [torch.full_like(p, float("nan")) for p in plan.shared]
        specific = [torch.full_like(p, float("nan")) for p, _ in plan.specific]
    return UpdateResult(shared, specific, None, None)


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device_type`` inside the block if it is enabled there."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def scaler_step(grad_scaler: object, optimizer: Optimizer, params: list[Tensor]) -> bool:
    """``grad_scaler.step(optimizer)``; returns whether it skipped the step (inf/NaN found).

    ``params`` are the parameters the JD step wrote ``.grad`` into; when their update was not
    finite (or could not be computed), their ``.grad`` holds NaNs so that the scaler records the
    overflow and skips the step, and ``scaler.update()`` lowers the scale.
    """
    with torch.no_grad():
        found_inf = not all_finite([p.grad for p in params if p.grad is not None])
    _as_scaler(grad_scaler).step(optimizer)
    return found_inf


def poison_grads(params: list[Tensor]) -> None:
    """Fill the ``.grad`` of ``params`` with NaN: an overflowed scaled backward, for the scaler."""
    with torch.no_grad():
        for param in params:
            if param.grad is None:
                param.grad = torch.full_like(param, float("nan"))
            else:
                param.grad.fill_(float("nan"))
