r"""Turning the losses of one step into gradients: the seam between JDOptimizer and the engines.

An :class:`UpdateComputer` receives the validated losses, the parameter plan and the aggregator,
and returns the gradients to accumulate. Two local implementations exist:

* :class:`~jdoptim.updates.jacobian.JacobianUpdate`: one batched backward gives the Jacobian blocks
  ``J_p = ∂losses/∂p`` of shape ``[m, *p.shape]`` for the shared and the specific parameters;
  the Gramian is ``G = Σ_p J_p J_pᵀ`` (never concatenating ``J``); a Gramian-weighted aggregator
  then gives ``w = W(G)`` and each shared parameter gets ``wᵀ J_p``; any other aggregator gets the
  concatenated ``J``. A specific parameter of loss ``i`` gets row ``i`` of its block.
* :class:`~jdoptim.updates.gramian.GramianUpdate`: the hook-based engine of
  ``JDOptimizer(modules=...)``.

**Design: the whole interface is declared here.** ``JDOptimizer.step`` is a sequence of phases
(parse → agree → plan → compute → check → apply, see :mod:`jdoptim.optimizer`), and every
phase that depends on the setting asks the update computer through a method of
:class:`UpdateComputer`, never by probing for attributes:

=========================  ====================================================================
``max_loss_dim``           parse: how many dimensions a loss tensor may have (1, or 2 for the
                           engine's ``[batch, tasks]`` losses)
``distributed``            whether a process group is involved (method inputs that one process
                           alone sees are refused then)
``agree(error, bad)``      agree: every process learns whether another one failed its checks
                           or has a non-finite loss; locally, re-raise ``error`` and return
                           ``bad``
``compute(...)``           compute: the :class:`UpdateResult`
``check(result)``          check: name what is non-finite in the result (refuse the step), or
                           ``None``
``step_optimizer(...)``    apply: run the wrapped optimizer's step on the accumulated ``.grad``;
                           return why it was skipped, or ``None``
``forget_aggregator_sync`` after a checkpoint load or a restore of the aggregator's state
=========================  ====================================================================

What varies with the setting is a *wrapper* (a decorator) of an update computer, not a branch in
``step``: :class:`~jdoptim.updates.scaled.ScaledUpdate` (a ``GradScaler``: scale the losses, unscale
what the aggregator sees, defer the finiteness check and the step to the scaler) wraps the local or
the distributed computers alike; the distributed computers (:mod:`jdoptim.distributed`) own the
agreement between processes; the routes of ``features=`` and ``extra_batches=``
(:mod:`jdoptim.updates.method`) are computers of one step that borrow everything but ``compute``
from the optimizer's own. A computer derives from :class:`UpdateComputer` and overrides what differs
from the local defaults.

Typed statistics: a distributed computer returns its traffic as ``UpdateResult.stats``
(:class:`~jdoptim.record.CommunicationStats`), which the step puts on
``StepRecord.communication``; ``UpdateResult.extras`` is for what a method adds about itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from ..aggregation import Aggregator, GramianWeightedAggregator, Weighting
from ..linalg.finite import all_finite, is_finite
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from ..record import CommunicationStats


@dataclass
class UpdateResult:
    """Gradients for ``plan.shared`` and ``plan.specific`` (same order), weights and Gramian.

    ``stats`` is the step's traffic (distributed computers only; ``StepRecord.communication``);
    ``extras`` what a method adds about itself (copied into ``StepRecord.extras``);
    ``partitioned`` the computer's fresh tensors of which some gradients are disjoint views,
    stored in ``.grad`` without a copy (:func:`jdoptim.grads.store_gradients`).
    """

    shared_grads: list[Tensor]
    specific_grads: list[Tensor]
    weights: Tensor | None
    gramian: Tensor | None
    stats: CommunicationStats | None = None
    extras: dict[str, object] = field(default_factory=dict)
    partitioned: tuple[Tensor, ...] = ()

    def __post_init__(self) -> None:
        if self.stats is not None and not isinstance(self.stats, CommunicationStats):
            raise TypeError(
                "UpdateResult.stats must be a jdoptim.record.CommunicationStats or None, got "
                f"{type(self.stats).__name__}: pass a method's own entries as extras={{...}}."
            )


class UpdateRoute(Protocol):
    """What computes one step's update and nothing else (the ``features=`` and
    ``extra_batches=`` routes); :class:`UpdateComputer` is the whole interface."""

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult: ...


class UpdateComputer(ABC):
    """The interface of an update computer, with the defaults of a local (one-process) one.

    See the module docstring for which phase of ``JDOptimizer.step`` calls each member.
    """

    #: ``JDOptimizer.step`` accepts loss tensors of up to this many dimensions.
    max_loss_dim: int = 1
    #: Whether the update is reduced across processes.
    distributed: bool = False

    @abstractmethod
    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        """The gradients of one step; writes nothing to a parameter or its ``.grad``."""

    def agree(self, error: BaseException | None, nonfinite: bool) -> bool:
        """After this process checked its step's input: re-raise ``error`` if it raised, else
        return whether a loss is non-finite (on any process, for a distributed computer)."""
        if error is not None:
            raise error
        return nonfinite

    def check(self, result: UpdateResult) -> str | None:
        """Name what is non-finite in ``result`` (the step is then refused), or ``None``."""
        return nonfinite_part(result)

    def step_optimizer(self, optimizer: Optimizer, params: list[Tensor]) -> str | None:
        """Run ``optimizer.step()`` on the accumulated ``.grad`` of ``params``; return why the
        step was skipped, or ``None`` (a plain optimizer never skips)."""
        optimizer.step()
        return None

    def forget_aggregator_sync(self) -> None:
        """The aggregator's state was loaded or restored (a no-op unless distributed)."""
        return None


class WrappedUpdate(UpdateComputer):
    """An update computer around another one, ``inner``: every member is ``inner``'s
    (``max_loss_dim`` and ``distributed`` read and written through) unless a subclass overrides
    it. The ``features=`` / ``extra_batches=`` routes (:class:`~jdoptim.updates.method.
    RoutedUpdate`) and the GradScaler (:class:`~jdoptim.updates.scaled.ScaledUpdate`) wrap the
    optimizer's own computer this way."""

    def __init__(self, inner: UpdateComputer) -> None:
        self.inner = inner

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

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        return self.inner.compute(batch, plan, aggregator)

    def agree(self, error: BaseException | None, nonfinite: bool) -> bool:
        return self.inner.agree(error, nonfinite)

    def check(self, result: UpdateResult) -> str | None:
        return self.inner.check(result)

    def step_optimizer(self, optimizer: Optimizer, params: list[Tensor]) -> str | None:
        return self.inner.step_optimizer(optimizer, params)

    def forget_aggregator_sync(self) -> None:
        self.inner.forget_aggregator_sync()


class NonFiniteJacobianError(FloatingPointError):
    """The losses are finite but their Jacobian (hence its Gramian) is not."""


def ensure_finite(tensor: Tensor, what: str) -> None:
    """Raise :class:`NonFiniteJacobianError` if ``tensor`` (a Gramian or Jacobian) is not finite."""
    if not is_finite(tensor):
        raise NonFiniteJacobianError(f"Non-finite entries in the losses' {what}")


def weigh(weighting: Weighting, gramian: Tensor) -> Tensor:
    """``w = W(G)`` for a Gramian an update computer built (square, symmetric by construction,
    already checked finite): the module call (with its hooks) under ``no_grad``, without
    :meth:`Weighting.__call__`'s input validation, a dozen small tensor operations per step."""
    if not torch.is_grad_enabled():  # (the engine's step weighs under no_grad already)
        return nn.Module.__call__(weighting, gramian)
    with torch.no_grad():
        return nn.Module.__call__(weighting, gramian)


def gramian_weights(aggregator: GramianWeightedAggregator, gramian: Tensor) -> Tensor:
    """``w = W(G)`` for the aggregator's weighting ``W``, after checking that ``G`` is finite."""
    ensure_finite(gramian, "Gramian")
    return weigh(aggregator.weighting, gramian)


def aggregate_jacobian(aggregator: Aggregator, matrix: Tensor) -> Tensor:
    """``d = A(J)``, after checking that ``J`` is finite."""
    ensure_finite(matrix, "Jacobian")
    return aggregator(matrix)


def nonfinite_part(result: UpdateResult) -> str | None:
    """Name what is non-finite in ``result``, or ``None``.

    When the Gramian and the weights are finite, so are the shared gradients ``wᵀJ_p``: a
    non-finite entry of ``J`` makes a diagonal entry ``G_ii = ‖J_i‖²`` non-finite. Every update
    computer refuses a non-finite Gramian before weighting it (:func:`gramian_weights`), so with
    weights, only the specific gradients, which ``G`` does not cover, are checked entry by entry;
    this keeps the check off the per-parameter hot path.
    """
    if result.weights is not None and not is_finite(result.weights):
        return "aggregation weights"
    covered = result.weights is not None and result.gramian is not None
    grads = result.specific_grads if covered else result.shared_grads + result.specific_grads
    if grads and not all_finite(grads):
        return "aggregated gradient"
    return None
