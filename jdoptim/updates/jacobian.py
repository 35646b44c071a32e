r"""``JacobianUpdate``: the update from an explicit Jacobian (the default update computer).

One batched backward (:mod:`jdoptim.autojac`) gives the Jacobian blocks ``J_p = ∂losses/∂p`` of
shape ``[m, *p.shape]`` for the shared and the specific parameters; the Gramian is
``G = Σ_p J_p J_pᵀ`` (never concatenating ``J``). A Gramian-weighted aggregator then gives
``w = W(G)`` and each shared parameter gets ``wᵀ J_p``; any other aggregator gets the
concatenated ``J`` and its direction is split back per parameter. A specific parameter of loss
``i`` gets row ``i`` of its block. The interface is :class:`~jdoptim.updates.base.UpdateComputer`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..autojac import JacobianComputer
from ..linalg.gramian import gramian_of_blocks
from ..linalg.sparse_rows import CompactRows, compact_rows, dense
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from .base import UpdateComputer, UpdateResult, aggregate_jacobian, gramian_weights

__all__ = ["JacobianUpdate"]


class JacobianUpdate(UpdateComputer):
    """The update from an explicit (batched-backward) Jacobian; see the module docstring."""

    def __init__(self, use_vmap: bool = True) -> None:
        self.jacobian_computer = JacobianComputer(use_vmap)

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        shared = list(plan.shared)
        inputs = shared + [param for param, _ in plan.specific]
        raw = self.jacobian_computer.compute(batch.vector, inputs)
        # A sparse block (a sparse embedding's) is computed on its looked-up rows only, and its
        # gradient given back sparse, as backward() gives it (jdoptim.linalg.sparse_rows).
        compact = [None if b.layout is torch.strided else compact_rows(b) for b in raw]
        blocks = [dense(b) if c is None else c.block for b, c in zip(raw, compact)]
        shared_blocks, specific_blocks = blocks[: len(shared)], blocks[len(shared) :]
        specific_grads = [
            _gradient(block[index], rows)
            for block, (_, index), rows in zip(
                specific_blocks, plan.specific, compact[len(shared) :]
            )
        ]
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
                    piece.view(block.shape[1:])
                    for piece, block in zip(direction.split(sizes), shared_blocks)
                ]
            shared_grads = [_gradient(g, rows) for g, rows in zip(shared_grads, compact)]
        return UpdateResult(shared_grads, specific_grads, weights, gramian)


def _gradient(grad: Tensor, rows: CompactRows | None) -> Tensor:
    """A parameter's gradient from its (compact, if ``rows``) block's arithmetic."""
    return grad if rows is None else rows.expand(grad)
