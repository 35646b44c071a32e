r"""Cross-batch steps: ``opt.step(losses, extra_batches=[...])`` for MoDo and SDMGrad.

MoDo and SDMGrad weigh the losses from ``A = J₁ J₂ᵀ``, the product of the Jacobians (over the
shared parameters) of the **same** ``m`` losses on two **independent** mini-batches: its
expectation is ``E[J] E[J]ᵀ``, without the variance term that one batch's ``J Jᵀ`` carries. So a
step needs two or three batches' losses:

* ``opt.step(losses_1, extra_batches=[losses_2])``: ``w = W(J₁ J₂ᵀ)``, and the update is
  ``Σᵢ wᵢ ∇ℓᵢ`` of the mean of the two batches' losses, ``ℓᵢ = (ℓᵢ⁽¹⁾ + ℓᵢ⁽²⁾)/2`` (MoDo's
  eq. 2.9b);
* ``opt.step(losses_1, extra_batches=[losses_2, losses_3])``: ``w = W(J₁ J₂ᵀ)`` and the update
  is ``Σᵢ wᵢ ∇ℓᵢ⁽³⁾`` on the third batch (SDMGrad's ``ξ, ξ', ζ``; MoDo with three draws, as in
  LibMTL), so that the weights and the update use independent draws.

Each batch is given like ``losses`` (a sequence, a mapping with the same keys, or a 1-D tensor)
and must be computed by separate forward passes on independent data: jdoptim cannot check
independence. The update (:class:`CrossBatchUpdate`) is an ordinary step of the update batch
with the weights fixed (shared parameters get ``Σᵢ wᵢ ∇ℓᵢ``, each specific parameter its own
loss's gradient), so
``StepRecord.gramian`` is the update batch's Gramian; ``record.extras["cross"]`` holds ``A``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..aggregation import Aggregator, GramianWeightedAggregator, Weighting
from ..aggregation._inputs import InputWeighting, MethodInputs
from ..autojac import compute_jacobian
from ..losses import LossBatch, nonfinite_loss_names, parse_losses
from ..parameter_plan import ParameterPlan
from .base import UpdateComputer, UpdateResult, ensure_finite

__all__ = ["CrossBatchUpdate", "CrossBatches"]


def cross_weighting(aggregator: Aggregator) -> InputWeighting | None:
    """The weighting of ``aggregator`` if it needs ``A = J₁J₂ᵀ``, else ``None``."""
    weighting = getattr(aggregator, "weighting", None)
    if not isinstance(aggregator, GramianWeightedAggregator):
        return None
    if isinstance(weighting, InputWeighting) and "cross" in weighting.needs:
        return weighting
    return None


@dataclass(frozen=True)
class CrossBatches:
    """The batches of one cross-batch step: ``A = J(first) J(second)ᵀ``; update on ``update``."""

    first: LossBatch
    second: LossBatch
    update: LossBatch

    @classmethod
    def parse(
        cls, batch: LossBatch, extra_batches: object, aggregator: Aggregator
    ) -> CrossBatches | None:
        """Validate ``extra_batches`` against ``aggregator``; ``None`` for an ordinary step."""
        weighting = cross_weighting(aggregator)
        if extra_batches is None:
            if weighting is not None:
                raise ValueError(
                    f"{type(weighting).__name__} weighs the losses by J₁J₂ᵀ, the Jacobians of two "
                    "independent mini-batches: call opt.step(losses_1, extra_batches=[losses_2]) "
                    "or opt.step(losses_1, extra_batches=[losses_2, losses_3]) (see "
                    "jdoptim.updates.cross_batch)."
                )
            return None
        if weighting is None:
            raise ValueError(
                f"extra_batches is for methods that weigh the losses by J₁J₂ᵀ (MoDo, SDMGrad); "
                f"{type(aggregator).__name__} uses one batch: call opt.step(losses)."
            )
        if not isinstance(extra_batches, Sequence) or len(extra_batches) not in (1, 2):
            raise ValueError(
                "extra_batches must be a list of one or two more batches of the same losses: "
                "[losses_2] (update on the mean of both) or [losses_2, losses_3] (update on the "
                "third)."
            )
        extras = [parse_losses(losses, 1) for losses in extra_batches]
        for index, extra in enumerate(extras, start=2):
            _check_same_losses(batch, extra, index)
        if len(extras) == 2:
            return cls(batch, extras[0], extras[1])
        return cls(batch, extras[0], _mean_batch(batch, extras[0]))

    def cross_matrix(self, shared: Sequence[Tensor]) -> Tensor:
        """``A = Σ_p J₁_p J₂_pᵀ`` over the shared parameters (graphs kept for the update)."""
        first = compute_jacobian(self.first.vector, shared, retain_graph=True)
        second = compute_jacobian(self.second.vector, shared, retain_graph=True)
        m = self.first.m
        with torch.no_grad():
            cross = self.first.vector.new_zeros(m, m)
            for a, b in zip(first, second):
                cross += a.reshape(m, -1) @ b.reshape(m, -1).T
        ensure_finite(cross, "cross-batch product J₁J₂ᵀ")
        return cross


def _check_same_losses(batch: LossBatch, extra: LossBatch, index: int) -> None:
    if extra.m != batch.m or extra.names != batch.names:
        raise ValueError(
            f"Batch {index} of extra_batches has the losses {list(extra.names)} but the first "
            f"batch has {list(batch.names)}: every batch must give the same losses (same keys, "
            "same order)."
        )
    bad = nonfinite_loss_names(extra)
    if bad:
        raise FloatingPointError(
            f"Non-finite loss value in batch {index} of extra_batches ({', '.join(bad)}): "
            "nothing was updated."
        )


def _mean_batch(first: LossBatch, second: LossBatch) -> LossBatch:
    vector = (first.vector + second.vector) / 2.0
    separate = None
    if first.separate is not None and second.separate is not None:
        separate = tuple((a + b) / 2.0 for a, b in zip(first.separate, second.separate))
    return dataclasses.replace(first, vector=vector, separate=separate)


class _FixedWeighting(Weighting):
    """Returns the weights it was built with, whatever the Gramian."""

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, gramian: Tensor) -> Tensor:
        return self.weights.to(dtype=gramian.dtype, device=gramian.device)


class CrossBatchUpdate:
    """The update computer of a cross-batch step: ``w = W(J₁J₂ᵀ)``, then ``inner`` applies ``w``
    to the update batch (its Gramian is ignored). Runs inside the step's refusal handling, so a
    non-finite ``J₁J₂ᵀ`` is refused or skipped like a non-finite Gramian."""

    def __init__(self, inner: UpdateComputer, batches: CrossBatches) -> None:
        self.inner = inner
        self.batches = batches

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        weighting = cross_weighting(aggregator)
        assert weighting is not None
        cross = self.batches.cross_matrix(plan.shared)
        inputs = MethodInputs(cross=cross, losses=batch.vector.detach())
        with torch.no_grad():
            weights = weighting(inputs)
        fixed = GramianWeightedAggregator(_FixedWeighting(weights))
        result = self.inner.compute(batch, plan, fixed)
        result.extras["cross"] = cross
        return result
