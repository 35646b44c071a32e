"""Base classes of the aggregation library.

An :class:`Aggregator` maps a Jacobian ``J ∈ R^{m×n}`` (one row per loss) to an update vector
``d ∈ R^n``. A :class:`Weighting` maps the Gramian ``G = J Jᵀ ∈ R^{m×m}`` to one weight per loss
``w ∈ R^m``. Whenever a method's weights depend on ``J`` only through ``G``, the method is written
once, as a Weighting, and its Aggregator is :class:`GramianWeightedAggregator`, i.e.

    d = A(J) = W(J Jᵀ)ᵀ J.

This is what lets :class:`jdoptim.JDOptimizer` run such methods from the Gramian alone, which the
hook-based Gramian engine computes without ever holding ``J``.

Scale and precision (see :mod:`._scaling`): an aggregator computes float16/bfloat16 input in
float32 and returns the input's dtype; a Weighting whose ``scale_degree`` is declared lets
:class:`GramianWeightedAggregator` form the Gramian of ``J`` divided by a power of two, so that it
neither under- nor overflows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Generic, TypeVar

from torch import Tensor, nn

from ..linalg.finite import is_finite
from ._scaling import LOW_PRECISION, normalized_jacobian, times_power_of_two

_SYMMETRY_RTOL = 1e-4


def check_matrix(matrix: Tensor) -> None:
    """Raise a clear error unless ``matrix`` is a finite 2-D floating-point tensor."""
    if not isinstance(matrix, Tensor):
        raise TypeError(f"Expected a torch.Tensor Jacobian, got {type(matrix).__name__}.")
    if matrix.dim() != 2:
        raise ValueError(
            f"Expected a 2-D Jacobian of shape [m, n] (one row per loss), got shape "
            f"{tuple(matrix.shape)}. Flatten each loss's gradient into one row."
        )
    if not matrix.is_floating_point():
        raise TypeError(f"Expected a floating-point Jacobian, got dtype {matrix.dtype}.")
    if not is_finite(matrix):
        raise ValueError(
            "The Jacobian contains NaN or infinite entries: check the losses and the model for "
            "overflow (e.g. lower the learning rate or use gradient scaling)."
        )


def check_gramian(gramian: Tensor) -> None:
    """Raise a clear error unless ``gramian`` is a finite, square, symmetric 2-D tensor."""
    if not isinstance(gramian, Tensor):
        raise TypeError(f"Expected a torch.Tensor Gramian, got {type(gramian).__name__}.")
    if gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        raise ValueError(
            f"Expected a square Gramian of shape [m, m], got shape {tuple(gramian.shape)}. "
            "A Gramian is G = J Jᵀ for a Jacobian J of shape [m, n]."
        )
    if not gramian.is_floating_point():
        raise TypeError(f"Expected a floating-point Gramian, got dtype {gramian.dtype}.")
    if not is_finite(gramian):
        raise ValueError(
            "The Gramian contains NaN or infinite entries: check the losses and the model for "
            "overflow (e.g. lower the learning rate or use gradient scaling)."
        )
    if gramian.numel() > 0:
        scale = gramian.abs().max()
        asymmetry = (gramian - gramian.T).abs().max()
        if asymmetry > _SYMMETRY_RTOL * scale:
            raise ValueError(
                f"The Gramian is not symmetric (max |G - Gᵀ| = {asymmetry.item():.3g}, "
                f"max |G| = {scale.item():.3g}). Pass G = J @ J.T, not J itself."
            )


def check_preference(preference: Tensor | None, m: int) -> None:
    """Raise a clear error unless ``preference`` is ``None`` or a finite vector of length ``m``."""
    if preference is None:
        return
    if preference.dim() != 1 or preference.shape[0] != m:
        raise ValueError(
            f"The preference vector has shape {tuple(preference.shape)} but there are {m} "
            f"losses: give one entry per loss (shape [{m}])."
        )
    if not is_finite(preference):
        raise ValueError("The preference vector contains NaN or infinite entries.")


#: What ``forward`` receives: the Gramian (or Jacobian) ``Tensor``, or the ``MethodInputs`` of
#: a method that needs more (:mod:`jdoptim.aggregation._inputs`); a bare ``Weighting`` or
#: ``Aggregator`` leaves it open.
InputT = TypeVar("InputT")


class Weighting(nn.Module, ABC, Generic[InputT]):
    """Maps a Gramian ``G ∈ R^{m×m}`` to a vector of ``m`` weights, one per loss.

    Subclasses implement :meth:`forward`; ``__call__`` validates the input first.

    ``scale_degree``: ``k`` when the weights follow ``W(tG) = t^k W(G)`` for every ``t > 0``
    (``0`` for scale-free weights), ``None`` (the default) when they follow no such law. A
    class attribute, or an instance attribute where it depends on a hyperparameter.
    """

    scale_degree: float | None = None

    def __call__(self, gramian: Tensor) -> Tensor:
        check_gramian(gramian)
        return super().__call__(gramian)

    @abstractmethod
    def forward(self, gramian: InputT) -> Tensor:
        """Return the weights ``w ∈ R^m`` of the losses whose Gramian is ``gramian``."""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return f"{type(self).__name__}({extra})"


class Aggregator(nn.Module, ABC, Generic[InputT]):
    """Maps a Jacobian ``J ∈ R^{m×n}`` (one row per loss) to an update vector ``d ∈ R^n``.

    Subclasses implement :meth:`forward`; ``__call__`` validates the input first.
    """

    def __call__(self, matrix: Tensor) -> Tensor:
        check_matrix(matrix)
        if matrix.dtype in LOW_PRECISION:
            return super().__call__(matrix.float()).to(matrix.dtype)
        return super().__call__(matrix)

    @abstractmethod
    def forward(self, matrix: InputT) -> Tensor:
        """Return the aggregated update ``d ∈ R^n`` of the Jacobian ``matrix ∈ R^{m×n}``."""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return f"{type(self).__name__}({extra})"


class GramianWeightedAggregator(Aggregator):
    """An aggregator of the form ``d = W(J Jᵀ)ᵀ J`` for a :class:`Weighting` ``W``.

    :class:`jdoptim.JDOptimizer` recognises this class and feeds :attr:`weighting` the Gramian
    directly, so that these methods never need the full Jacobian.
    """

    def __init__(self, weighting: Weighting) -> None:
        super().__init__()
        self.weighting = weighting

    def forward(self, matrix: Tensor) -> Tensor:
        degree = self.weighting.scale_degree
        if degree is None:
            return self.weighting(matrix @ matrix.T) @ matrix
        # W(J'J'ᵀ) for J' = J / 2^e, which cannot under- or overflow (see ._scaling).
        normalized, exponent = normalized_jacobian(matrix)
        weights = self.weighting(normalized @ normalized.T)
        if degree == 0:
            return weights @ matrix
        return times_power_of_two(weights @ normalized, exponent * (1 + 2 * degree))

    def extra_repr(self) -> str:
        return self.weighting.extra_repr()
