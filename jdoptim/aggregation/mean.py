"""The mean of the gradients: ``d = (1/m) Σᵢ gᵢ``, i.e. plain gradient descent on the mean loss."""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting


class MeanWeighting(Weighting):
    """Uniform weights ``wᵢ = 1/m``. Differentiable (the weights are constant)."""

    scale_degree = 0.0

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)


class Mean(GramianWeightedAggregator):
    """``d = (1/m) Σᵢ Jᵢ``: the gradient of the mean loss. Differentiable.

    Its Weighting is :class:`MeanWeighting`; called on a Jacobian it skips the Gramian and
    averages the rows directly.
    """

    def __init__(self) -> None:
        super().__init__(MeanWeighting())

    def forward(self, matrix: Tensor) -> Tensor:
        return matrix.mean(dim=0)
