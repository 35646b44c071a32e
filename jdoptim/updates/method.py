"""What one step gives the method, and which update computer runs it.

:func:`prepare_method` is called by :meth:`jdoptim.JDOptimizer.step` after the parameter plan and
before the update computer runs. It returns, for this step:

* the aggregator, with the inputs it declared bound to it (:func:`~jdoptim.aggregation._inputs.
  bind_inputs`): the loss values, a chosen layer's Gramian (GradNorm);
* the update computer: the optimizer's own,
  :class:`~jdoptim.updates.features.FeaturesUpdate` for ``features=``, or
  :class:`~jdoptim.updates.cross_batch.CrossBatchUpdate` around the optimizer's own for
  ``extra_batches=``. A route is only a ``compute``; :class:`RoutedUpdate` gives it the rest of
  the :class:`~jdoptim.updates.base.UpdateComputer` interface from the optimizer's own computer,
  so that the step's later phases (and a ``GradScaler``'s
  :class:`~jdoptim.updates.scaled.ScaledUpdate`) treat every route alike.

Nothing is written to a parameter or its ``.grad`` here: a refusal leaves everything unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import Tensor

from ..aggregation import Aggregator
from ..aggregation._inputs import bind_inputs, needs_of
from ..autojac import compute_jacobian
from ..linalg.gramian import gramian_of_blocks
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from .base import (
    UpdateComputer,
    UpdateResult,
    UpdateRoute,
    WrappedUpdate,
    ensure_finite,
)
from .cross_batch import CrossBatches, CrossBatchUpdate
from .features import FeaturesUpdate, check_features

__all__ = [
    "CrossBatches",
    "MethodStep",
    "RoutedUpdate",
    "check_method_arguments",
    "check_method_step",
    "prepare_method",
]

_SUPPORTED = frozenset({"losses", "layer_gramian", "cross"})


@dataclass
class MethodStep:
    """The aggregator (with its inputs bound) and the update computer of one step."""

    aggregator: Aggregator
    computer: UpdateComputer


class RoutedUpdate(WrappedUpdate):
    """``route.compute`` with the rest of the interface (``agree``, ``check``,
    ``step_optimizer``, …) of ``base``, the optimizer's own computer."""

    def __init__(self, route: UpdateRoute, base: UpdateComputer) -> None:
        super().__init__(base)
        self.route = route

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        return self.route.compute(batch, plan, aggregator)


def check_method_arguments(scalarizer: object, features: object, extra_batches: object) -> None:
    """Refuse ``features=`` / ``extra_batches=`` with a loss-only method (one backward, no
    Gramian: there is nothing for them to change)."""
    if scalarizer is not None and (features is not None or extra_batches is not None):
        raise ValueError(
            "features= and extra_batches= are for gradient-weighting methods; a scalarizer "
            "weighs the losses from their values alone: call opt.step(losses)."
        )


def check_method_step(
    aggregator: Aggregator,
    computer: UpdateComputer,
    *,
    features: object = None,
    cross: CrossBatches | None = None,
    scaled: bool = False,
) -> None:
    """Refuse, before anything is computed, a step whose method, ``features=``,
    ``extra_batches=`` and options do not go together; changes nothing."""
    needs = needs_of(aggregator)
    if computer.distributed and (needs or features is not None or cross is not None):
        raise ValueError(
            "With process_group, JDOptimizer supports methods of the Gramian or the Jacobian "
            "only: features=, extra_batches= and methods that need the loss values would see "
            "one process's values only. Drop process_group or use another method."
        )
    unknown = needs - _SUPPORTED
    if unknown:
        raise ValueError(
            f"{type(aggregator).__name__} needs {sorted(unknown)}, which "
            "JDOptimizer cannot provide."
        )
    if scaled and cross is not None:
        raise ValueError("extra_batches= does not support grad_scaler yet: drop one of them.")
    if features is not None and cross is not None:
        raise ValueError("features= and extra_batches= cannot be combined in one step.")
    if features is not None:
        check_features(features)


def prepare_method(
    aggregator: Aggregator,
    batch: LossBatch,
    plan: ParameterPlan,
    computer: UpdateComputer,
    *,
    features: Tensor | None = None,
    cross: CrossBatches | None = None,
    scaled: bool = False,
) -> MethodStep:
    """The aggregator and update computer of this step (see the module docstring)."""
    check_method_step(aggregator, computer, features=features, cross=cross, scaled=scaled)
    needs = needs_of(aggregator)
    step_computer = (
        computer if features is None else RoutedUpdate(FeaturesUpdate(features), computer)
    )
    if cross is not None:  # W(J₁J₂ᵀ) is computed inside the update computer
        return MethodStep(
            aggregator, RoutedUpdate(CrossBatchUpdate(step_computer, cross), computer)
        )
    extra: dict[str, Tensor] = {}
    if "losses" in needs:
        extra["losses"] = batch.vector.detach()
    if "layer_gramian" in needs:
        extra["layer_gramian"] = _layer_gramian(aggregator, batch)
    return MethodStep(bind_inputs(aggregator, extra), step_computer)


@runtime_checkable
class _NamesLayerParams(Protocol):
    """A method that names the parameters of the layer whose Gramian it needs."""

    def layer_params(self) -> tuple[Tensor, ...]: ...


def _layer_gramian(aggregator: Aggregator, batch: LossBatch) -> Tensor:
    """The Gramian of the losses over the parameters the method names (its ``layer_params``)."""
    weighting = getattr(aggregator, "weighting", aggregator)
    if not isinstance(weighting, _NamesLayerParams):
        raise TypeError(
            f"{type(weighting).__name__} declares that it needs 'layer_gramian' but has no "
            "layer_params() naming the parameters of its layer: define layer_params()."
        )
    params = list(weighting.layer_params())
    blocks = compute_jacobian(batch.vector, params, retain_graph=True)
    gramian = gramian_of_blocks(blocks).detach()
    ensure_finite(gramian, "Gramian over the method's layer")
    return gramian
