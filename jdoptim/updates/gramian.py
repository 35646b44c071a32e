r"""``GramianUpdate``: the update computer of ``JDOptimizer(modules=...)``.

For a :class:`~jdoptim.aggregation.GramianWeightedAggregator` with weighting ``W``:

* losses given separately (a list or mapping: task losses) or as one vector without
  ``batch_dim``: ``G`` over the shared parameters, ``w = W(G)``, the shared parameters get
  ``Σᵢ wᵢ ∇ℓᵢ`` and each specific parameter its loss's gradient, all from one backward pass;
* ``batch_dim`` and a ``[batch]`` vector of per-sample losses: instance-wise risk minimisation,
  ``G`` is the per-sample Gramian (``b × b``) and ``w = W(G)``;
* a ``[batch, tasks]`` matrix: instance-wise multi-task learning, ``w = Flattening(W)(G)`` on the
  generalized Gramian ``[batch, tasks, tasks, batch]``.

Any other aggregator needs the whole Jacobian: :class:`~jdoptim.updates.jacobian.JacobianUpdate`
runs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..aggregation.flattening import Flattening
from ..autogram.engine import Engine, gramian_dtype
from ..linalg.gramian import generalize_gramian
from ..linalg.torch_errors import OutOfMemoryError
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from .base import UpdateComputer, UpdateResult, ensure_finite, weigh
from .jacobian import JacobianUpdate

__all__ = ["GramianUpdate"]

_OUT_OF_MEMORY = (
    "jdoptim: out of memory in the Gramian engine's step, which holds every hooked layer's "
    "output gradients (one row per task loss, or per loss of a sample) until the weights are "
    "known. JDOptimizer(..., modules=model, low_memory=True) takes each layer's Gramian term "
    "during the backward pass and lets them go, for one more backward pass (README: 'Low "
    "memory'); fewer task losses per step or a smaller batch also reduce it."
)


class GramianUpdate(UpdateComputer):
    """The update from the hook-based Gramian engine; see the module docstring."""

    #: ``JDOptimizer.step`` accepts loss tensors of up to this many dimensions with this computer.
    max_loss_dim = 2

    def __init__(
        self, modules: Sequence[nn.Module], batch_dim: int | None = None, low_memory: bool = False
    ) -> None:
        self.engine = Engine(*modules, batch_dim=batch_dim, low_memory=low_memory)
        self.fallback = JacobianUpdate()

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        if not isinstance(aggregator, GramianWeightedAggregator):
            return self.fallback.compute(batch, plan, aggregator)
        try:
            return self._engine_step(batch, plan, aggregator)
        except OutOfMemoryError as err:
            if self.engine.low_memory:
                raise
            raise type(err)(f"{err}\n\n{_OUT_OF_MEMORY}") from err

    def _engine_step(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: GramianWeightedAggregator
    ) -> UpdateResult:
        shape = getattr(batch, "shape", None)
        losses = batch.vector if shape is None else batch.vector.reshape(shape)
        per_sample = batch.separate is None and self.engine.batch_dim is not None
        shared = list(plan.shared)
        specific = [p for p, _ in plan.specific]
        step = self.engine.step(
            losses,
            shared,
            specific,
            per_sample=per_sample,
        )
        if not shared:
            with torch.no_grad():
                _, specific_grads = step.gradients(None)
            return UpdateResult([], specific_grads, None, None)
        with torch.no_grad():
            gramian = step.gramian().to(gramian_dtype(batch.vector.dtype, shared))
            ensure_finite(gramian, "Gramian")  # once, for both branches below
            if losses.dim() > 1:
                generalized = generalize_gramian(gramian, tuple(losses.shape))
                weights = Flattening(aggregator.weighting)(generalized).reshape(-1)
            else:
                weights = weigh(aggregator.weighting, gramian)
            shared_grads, specific_grads = step.gradients(weights)
        parts = tuple(step.partitioned)
        return UpdateResult(shared_grads, specific_grads, weights, gramian, partitioned=parts)
