r"""COSMOS: a linear scalarization with a cosine-similarity reward towards a preference vector.

Ruchte & Grabocka, 2021, "Scalable Pareto Front Approximation for Deep Multi-Objective Learning",
ICDM, arXiv:2103.13392.

.. math::  s = \sum_i r_i \ell_i - \lambda \cos(r, \ell)
           = \sum_i r_i \ell_i - \lambda \frac{r^\top \ell}{\lVert r\rVert\,\lVert \ell\rVert}

with the preference ``r`` (``weights``) and the penalty coefficient ``λ`` (``lambda_``, no
default: the paper tunes it per data set, from ``0.01`` to ``8``). The cosine uses
:func:`torch.nn.functional.cosine_similarity` (norms clamped below at ``1e-8``). ``λ = 0`` is the
linear scalarization ``rᵀℓ``. The paper re-draws ``r`` from a Dirichlet distribution at every
step and feeds it to the model as an input; assign ``cosmos.weights`` before each call for that
(the model conditioning is the user's). Stateless.
"""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn.functional import cosine_similarity

from ._base import Scalarizer, check_same_shape
from ._floats import floats, value_and_weights

#: Below this norm of ``r`` or ``ℓ``, the closed form leaves the weights to autograd (the
#: cosine's clamping of the norms at ``1e-8`` then decides them).
_SMALLEST_CLOSED_FORM_NORM = 1e-6


class COSMOS(Scalarizer):
    r"""``s = rᵀℓ − λ cos(r, ℓ)``. Stateless.

    Args:
        lambda_: the penalty coefficient ``λ ≥ 0``.
        weights: the preference vector ``r`` (same shape as the values).
    """

    def __init__(self, lambda_: float, weights: Tensor) -> None:
        super().__init__()
        if not lambda_ >= 0.0:
            raise ValueError(f"COSMOS: `lambda_` must be non-negative, got {lambda_}.")
        self.lambda_ = lambda_
        self.weights = weights

    def _check(self, values: Tensor) -> None:
        check_same_shape(self.weights, values, "weights", "COSMOS")

    def _scalarize(self, values: Tensor) -> Tensor:
        linear = (self.weights * values).sum()
        cosine = cosine_similarity(self.weights.reshape(-1), values.reshape(-1), dim=0)
        return linear - self.lambda_ * cosine

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        r"""``s`` and ``w = r − λ ∂cos/∂ℓ``, ``∂cos/∂ℓ = r/(‖r‖‖ℓ‖) − cos · ℓ/‖ℓ‖²``, in floats
        (for norms of at least ``1e-6``; else ``None``: autograd)."""
        losses, preference = floats(values.detach()), floats(self.weights.detach())
        preference_norm, loss_norm = math.hypot(*preference), math.hypot(*losses)
        if not min(preference_norm, loss_norm) >= _SMALLEST_CLOSED_FORM_NORM:
            return None
        norms = preference_norm * loss_norm
        linear = math.fsum(r * v for r, v in zip(preference, losses))
        cosine = linear / norms
        squared = math.fsum(v * v for v in losses)
        weights = [
            r - self.lambda_ * (r / norms - cosine * v / squared)
            for r, v in zip(preference, losses)
        ]
        return value_and_weights(linear - self.lambda_ * cosine, weights, values)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, weights={self.weights!r}"
