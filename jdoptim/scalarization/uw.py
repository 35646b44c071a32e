r"""UW: uncertainty weighting, with one learnable log-variance per loss.

Kendall, Gal & Cipolla, 2018, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
Geometry and Semantics", CVPR.

.. math::  s = \sum_i \tfrac12 e^{-s_i} \ell_i + \tfrac12 s_i, \qquad s_i = \log \sigma_i^2 ,

(the homoscedastic-Gaussian likelihood, learning ``log σ²`` for stability). The effective weight of
loss ``i`` is ``e^{-sᵢ}/2``; descent on ``sᵢ`` drives it towards ``sᵢ = log ℓᵢ``, i.e. the weight
towards ``1/(2ℓᵢ)``. The log-variances start at ``0`` (weights ``1/2``), as in TorchJD (LibMTL
starts at ``-0.5``).

**Training.** The log-variances must be trained with the model. Standalone, give
``uw.parameters()`` to the optimizer. :class:`jdoptim.JDOptimizer` does it for you: ``JDOptimizer
(opt, UW(m))`` adds them to the wrapped optimizer as one new parameter group (its defaults, with
``weight_decay = 0``), unless the optimizer already holds them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..aggregation._mixins import Stateful
from ..aggregation.state import DeclaredState
from ._base import Scalarizer
from ._floats import floats, tensor_of, value_and_weights


def check_learned_shape(parameter: Tensor, values: Tensor, owner: str) -> None:
    if values.shape != parameter.shape:
        raise ValueError(
            f"{owner} was built for values of shape {tuple(parameter.shape)} (one learned "
            f"parameter per loss) but got values of shape {tuple(values.shape)}: build it with "
            f"{owner}(number_of_losses)."
        )
    if values.device != parameter.device:
        raise ValueError(
            f"{owner}'s parameters are on {parameter.device} but the values on {values.device}: "
            f"move it with .to(device) before the first step (and before building the optimizer)."
        )


class UW(DeclaredState, Stateful, Scalarizer):
    r"""``s = Σᵢ ½ e^{-sᵢ} ℓᵢ + ½ sᵢ`` with learnable log-variances ``sᵢ`` (``log_var``).

    Args:
        shape: the shape of the values (an int ``m`` is ``(m,)``).
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_var: nn.Parameter
        self.declare_state("log_var", nn.Parameter(torch.zeros(shape)))  # reset() zeroes it

    def _check(self, values: Tensor) -> None:
        check_learned_shape(self.log_var, values, "UW")

    def _scalarize(self, values: Tensor) -> Tensor:
        return (0.5 * torch.exp(-self.log_var) * values + 0.5 * self.log_var).sum()

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """``s`` and ``wᵢ = ½e^{-sᵢ}``, in floats."""
        losses, scales = floats(values.detach()), floats(self.log_var.detach())
        weights = [0.5 * math.exp(-s) for s in scales]
        value = math.fsum(w * v + 0.5 * s for w, v, s in zip(weights, losses, scales))
        return value_and_weights(value, weights, values)

    def _learned_gradients(self, values: Tensor) -> list[Tensor] | None:
        """``∂s/∂sᵢ = ½ − ½e^{-sᵢ} ℓᵢ`` (with :meth:`_value_and_weights`)."""
        losses, scales = floats(values.detach()), floats(self.log_var.detach())
        grads = [0.5 - 0.5 * math.exp(-s) * v for v, s in zip(losses, scales)]
        return [tensor_of(grads, self.log_var).view(self.log_var.shape)]

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [self.log_var]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_var.shape)}"
