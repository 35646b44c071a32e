r"""GeometricMean (GLS, the geometric loss strategy): ``s = (Πᵢ ℓᵢ)^{1/m}``.

Chennupati, Sistu, Yogamani & Rawashdeh, 2019, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops.

Computed as ``exp((1/m) Σᵢ log ℓᵢ)``; its effective weights are ``∂s/∂ℓᵢ = s / (m ℓᵢ)``, so a loss
that is already small gets a large weight. Defined for non-negative values (a zero value makes
``s = 0`` and its own weight undefined; :class:`jdoptim.JDOptimizer` refuses such a step).
Stateless.
"""

from __future__ import annotations

import math

from torch import Tensor

from ._base import Scalarizer
from ._floats import floats, value_and_weights


class GeometricMean(Scalarizer):
    r"""``s = exp((1/m) Σᵢ log ℓᵢ)``, the geometric mean of non-negative values. Stateless."""

    def _check(self, values: Tensor) -> None:
        if bool((values.detach() < 0).any()):
            raise ValueError(
                "GeometricMean is defined for non-negative values only; got a negative value. "
                "Shift the losses (e.g. by a known lower bound) or use another scalarizer."
            )

    def _scalarize(self, values: Tensor) -> Tensor:
        return values.log().mean().exp()

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """``s`` and ``wᵢ = s / (m ℓᵢ)``, in floats (for positive values; a zero value, whose
        weight is undefined, is left to autograd, and refused)."""
        losses = floats(values.detach())
        if not min(losses) > 0.0:
            return None
        m = len(losses)
        value = math.exp(math.fsum(math.log(v) for v in losses) / m)
        return value_and_weights(value, (value / (m * v) for v in losses), values)
