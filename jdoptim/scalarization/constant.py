r"""Constant: fixed, user-chosen weights, ``s = Σᵢ cᵢ ℓᵢ`` (linear scalarization)."""

from __future__ import annotations

from torch import Tensor

from ..linalg.finite import is_finite
from ._base import Scalarizer


class Constant(Scalarizer):
    r"""``s = Σᵢ cᵢ ℓᵢ`` with fixed weights ``c`` (the effective weights are ``c``). Stateless.

    Args:
        weights: the weights ``c``, one per value: the same shape as the values of each call.
    """

    def __init__(self, weights: Tensor) -> None:
        super().__init__()
        if not isinstance(weights, Tensor):
            raise TypeError(f"Constant: `weights` must be a tensor, got {type(weights).__name__}.")
        if not is_finite(weights):
            raise ValueError("Constant: `weights` contains NaN or infinite entries.")
        self.weights = weights

    def _check(self, values: Tensor) -> None:
        if values.shape != self.weights.shape:
            raise ValueError(
                f"Constant: the values have shape {tuple(values.shape)} but the weights have "
                f"shape {tuple(self.weights.shape)}; give one weight per value (loss)."
            )

    def _scalarize(self, values: Tensor) -> Tensor:
        return (self.weights * values).sum()

    def extra_repr(self) -> str:
        return f"weights={self.weights!r}"
