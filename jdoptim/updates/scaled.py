r"""``ScaledUpdate``: an update computer under a ``torch.amp.GradScaler``, as a wrapper.

The loss scaling of one step (:class:`~jdoptim.amp.LossScaling`: scale the losses, unscale what
the aggregator sees) and the user's view of mixed precision are in :mod:`jdoptim.amp`; this
module is the wrapper that applies them to any update computer.

``JDOptimizer.step`` builds one :class:`ScaledUpdate` per step around the step's update
computer (the optimizer's own, local or distributed, or the route of ``features=``) when a scaler
is given, and otherwise runs that computer as it is; no phase of the step branches on the
scaler. The wrapper (a :class:`~jdoptim.updates.base.WrappedUpdate`) overrides three members:

* ``compute`` scales the losses (:meth:`~jdoptim.amp.LossScaling.scale_batch`), gives the inner
  computer an aggregator that unscales its input (:meth:`~jdoptim.amp.LossScaling.wrap`), and
  unscales the result's Gramian. A non-finite Gramian or Jacobian (the scaled backward
  overflowed) is not an error here: the result is an update of NaNs, which the scaler will find;
* ``check`` refuses nothing: inf/NaN is the scaler's business (it skips the wrapped step);
* ``step_optimizer`` runs ``grad_scaler.step(optimizer)`` and says whether it skipped it.

The step then restores the aggregator's state after a skipped step, as after a refused one. The
agreement between processes, ``max_loss_dim`` and ``distributed`` are the inner computer's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..aggregation import Aggregator
from ..amp import LossScaling, scaler_step
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from .base import NonFiniteJacobianError, UpdateComputer, UpdateResult, WrappedUpdate

__all__ = ["ScaledUpdate", "scaled"]


class ScaledUpdate(WrappedUpdate):
    """An update computer under a ``GradScaler``, for one step (see the module docstring).

    Args:
        inner: the update computer of the step, which sees the scaled losses.
        scaling: the step's :class:`LossScaling` (its scale is fixed by :meth:`compute`).
    """

    def __init__(self, inner: UpdateComputer, scaling: LossScaling) -> None:
        super().__init__(inner)
        self.scaling = scaling
        self.overflow: str | None = None  # why the scaled backward gave no finite update

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
