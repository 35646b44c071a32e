r"""Turning the losses of one step into gradients: the seam between JDOptimizer and the engines.

An :class:`UpdateComputer` receives the validated losses, the parameter plan and the aggregator,
and returns the gradients to accumulate. Two implementations exist:

* :class:`JacobianUpdate` (this module): one batched backward gives the Jacobian blocks
  ``J_p = ∂losses/∂p`` of shape ``[m, *p.shape]`` for the shared and the specific parameters;
  the Gramian is ``G = Σ_p J_p J_pᵀ`` (never concatenating ``J``); a Gramian-weighted aggregator
  then gives ``w = W(G)`` and each shared parameter gets ``wᵀ J_p``; any other aggregator gets the
  concatenated ``J``. A specific parameter of loss ``i`` gets row ``i`` of its block.
* :class:`jdoptim.autogram.GramianUpdate`: the hook-based engine of ``JDOptimizer(modules=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from .aggregation import Aggregator, GramianWeightedAggregator, Weighting
from .autojac import JacobianComputer
from .linalg.finite import is_finite
from .linalg.gramian import gramian_of_blocks
from .losses import LossBatch
from .parameter_plan import ParameterPlan


@dataclass
class UpdateResult:
    """Gradients for ``plan.shared`` and ``plan.specific`` (same order), weights and Gramian."""

    shared_grads: list[Tensor]
    specific_grads: list[Tensor]
    weights: Tensor | None
    gramian: Tensor | None
    extras: dict[str, object] = field(default_factory=dict)  # copied into StepRecord.extras


class UpdateComputer(Protocol):
    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult: ...


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


class JacobianUpdate:
    """The update from an explicit (batched-backward) Jacobian. See the module docstring."""

    def __init__(self, use_vmap: bool = True) -> None:
        self.jacobian_computer = JacobianComputer(use_vmap)

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        shared = list(plan.shared)
        inputs = shared + [param for param, _ in plan.specific]
        blocks = self.jacobian_computer.compute(batch.vector, inputs)
        shared_blocks, specific_blocks = blocks[: len(shared)], blocks[len(shared) :]
        specific_grads = [block[index] for block, (_, index) in zip(specific_blocks, plan.specific)]
        if not shared:
            return UpdateResult([], specific_grads, None, None)

        with torch.no_grad():
            gramian = gramian_of_blocks(shared_blocks)
            if isinstance(aggregator, GramianWeightedAggregator):
                weights = gramian_weights(aggregator, gramian)
                shared_grads = [
                    torch.tensordot(weights.to(block.dtype), block, dims=1)
                    for block in shared_blocks
                ]
            else:
                weights = None
                matrix = torch.cat([block.reshape(batch.m, -1) for block in shared_blocks], dim=1)
                direction = aggregate_jacobian(aggregator, matrix)
                sizes = [block[0].numel() for block in shared_blocks]
                shared_grads = [
                    piece.view_as(param) for piece, param in zip(direction.split(sizes), shared)
                ]
        return UpdateResult(shared_grads, specific_grads, weights, gramian)
