"""The sum of the gradients: ``d = Σᵢ gᵢ``, i.e. plain gradient descent on the summed loss."""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting


class SumWeighting(Weighting):
    """Unit weights ``wᵢ = 1``. Differentiable (the weights are constant)."""

    scale_degree = 0.0

    def forward(self, gramian: Tensor) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


class Sum(GramianWeightedAggregator):
    """``d = Σᵢ Jᵢ``: the gradient of the summed loss. Differentiable."""

    def __init__(self) -> None:
        super().__init__(SumWeighting())

    def forward(self, matrix: Tensor) -> Tensor:
        return matrix.sum(dim=0)
