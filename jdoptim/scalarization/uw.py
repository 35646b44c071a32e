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

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..aggregation._mixins import Stateful
from ..aggregation.state import DeclaredState
from ._base import Scalarizer


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

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [self.log_var]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_var.shape)}"
