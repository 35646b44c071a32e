r"""PBI: penalty-based boundary intersection, from decomposition-based multi-objective search.

Zhang & Li, 2007, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition",
IEEE Transactions on Evolutionary Computation 11(6).

With the shifted values ``f = ℓ − z*`` (``reference`` ``z*``, the origin by default) and the unit
preference direction ``ŵ = w / ‖w‖``:

.. math::  d_1 = f^\top \hat w, \qquad d_2 = \sqrt{\lVert f - d_1 \hat w\rVert^2 + 10^{-12}},
           \qquad s = d_1 + \theta\, d_2 .

``d₁`` is the progress along the preference direction, ``d₂`` the distance to it, penalised by
``θ`` (``theta``, no default; the paper uses ``5``). The ``10⁻¹²`` under the root keeps the
gradient finite when ``f`` lies on the direction (``d₂ = 0``, e.g. for a single value): it moves
``s`` by at most ``θ·10⁻⁶``. Stateless.
"""

from __future__ import annotations

import math

from torch import Tensor

from ._base import Scalarizer, check_same_shape
from ._floats import floats, value_and_weights

_SQUARED_NORM_FLOOR = 1e-12


class PBI(Scalarizer):
    r"""``s = d₁ + θ d₂`` (see the module docstring). Stateless.

    Args:
        theta: the penalty ``θ ≥ 0`` on the distance to the preference direction.
        weights: the preference ``w`` (non-negative, same shape as the values).
        reference: the ideal point ``z*`` (same shape as the values); ``None`` is the origin.
    """

    def __init__(self, theta: float, weights: Tensor, reference: Tensor | None = None) -> None:
        super().__init__()
        if not theta >= 0.0:
            raise ValueError(f"PBI: `theta` must be non-negative, got {theta}.")
        self.theta = theta
        self.weights = weights
        self.reference = reference

    def _check(self, values: Tensor) -> None:
        check_same_shape(self.weights, values, "weights", "PBI")
        check_same_shape(self.reference, values, "reference", "PBI")

    def _scalarize(self, values: Tensor) -> Tensor:
        shifted = values if self.reference is None else values - self.reference
        f = shifted.reshape(-1)
        direction = self.weights.reshape(-1)
        direction = direction / direction.norm()
        d1 = f @ direction
        residual = f - d1 * direction
        d2 = (residual @ residual + _SQUARED_NORM_FLOOR).sqrt()
        return d1 + self.theta * d2

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """``s`` and ``w = ŵ + θ (f − d₁ŵ)/d₂`` (the residual is orthogonal to ``ŵ``), in floats
        (for a non-zero preference; else ``None``: autograd)."""
        f = floats(values.detach())
        if self.reference is not None:
            f = [v - z for v, z in zip(f, floats(self.reference))]
        direction = floats(self.weights)
        norm = math.hypot(*direction)
        if not norm > 0.0:
            return None
        direction = [d / norm for d in direction]
        d1 = math.fsum(v * d for v, d in zip(f, direction))
        residual = [v - d1 * d for v, d in zip(f, direction)]
        d2 = math.sqrt(math.fsum(r * r for r in residual) + _SQUARED_NORM_FLOOR)
        weights = [d + self.theta * r / d2 for d, r in zip(direction, residual)]
        return value_and_weights(d1 + self.theta * d2, weights, values)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, weights={self.weights!r}, reference={self.reference!r}"
