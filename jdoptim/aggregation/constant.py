r"""Constant weighting: a fixed, user-given weight vector ``w ∈ R^m``, i.e. ``d = Σᵢ wᵢ gᵢ``
(gradient descent on the fixed linear scalarisation ``Σᵢ wᵢ ℓᵢ``).

Differentiable: the weights do not depend on the Gramian, and ``d = wᵀ J`` is linear in ``J``.
"""

from __future__ import annotations

from torch import Tensor

from ..linalg.finite import is_finite
from ._bases import GramianWeightedAggregator, Weighting


def _check_weights(weights: Tensor) -> None:
    if not isinstance(weights, Tensor):
        raise TypeError(f"`weights` must be a torch.Tensor, got {type(weights).__name__}.")
    if weights.dim() != 1 or weights.shape[0] == 0:
        raise ValueError(
            f"`weights` must be a non-empty 1-D tensor (one weight per loss), got shape "
            f"{tuple(weights.shape)}."
        )
    if not weights.is_floating_point():
        raise TypeError(f"`weights` must be floating-point, got dtype {weights.dtype}.")
    if not is_finite(weights):
        raise ValueError("`weights` contains NaN or infinite entries.")


class ConstantWeighting(Weighting):
    """Always returns ``weights`` (see the module docstring).

    Args:
        weights: the weight vector, one entry per loss (a buffer: it follows ``.to()``).
    """

    scale_degree = 0.0

    weights: Tensor

    def __init__(self, weights: Tensor) -> None:
        _check_weights(weights)
        super().__init__()
        self.register_buffer("weights", weights.detach().clone())

    def forward(self, gramian: Tensor) -> Tensor:
        return self.weights_for(gramian.shape[0], gramian)

    def weights_for(self, m: int, like: Tensor) -> Tensor:
        """The weights, checked against ``m`` losses, in ``like``'s dtype and device."""
        if self.weights.shape[0] != m:
            raise ValueError(
                f"ConstantWeighting has {self.weights.shape[0]} weights but there are {m} losses: "
                "give one weight per loss."
            )
        return self.weights.to(dtype=like.dtype, device=like.device)

    def extra_repr(self) -> str:
        return f"weights={self.weights.tolist()}"


class Constant(GramianWeightedAggregator):
    """``d = wᵀ J`` for a fixed ``w`` (see :class:`ConstantWeighting`). Differentiable.

    Called on a Jacobian it skips the Gramian.
    """

    weighting: ConstantWeighting

    def __init__(self, weights: Tensor) -> None:
        super().__init__(ConstantWeighting(weights))

    def forward(self, matrix: Tensor) -> Tensor:
        return self.weighting.weights_for(matrix.shape[0], matrix) @ matrix
