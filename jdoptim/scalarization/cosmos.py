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

from torch import Tensor
from torch.nn.functional import cosine_similarity

from ._base import Scalarizer, check_same_shape


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

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}, weights={self.weights!r}"
