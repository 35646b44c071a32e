r"""IMTLL: the loss-balancing half of impartial multi-task learning (IMTL-L).

Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, 2021, "Towards Impartial Multi-task Learning",
ICLR.

.. math::  s = \sum_i e^{s_i} \ell_i - s_i

with one learnable log-scale ``sᵢ`` per loss (``log_scale``, starting at ``0``: the plain sum).
The effective weight of loss ``i`` is ``e^{sᵢ}``; descent on ``sᵢ`` drives ``e^{sᵢ} ℓᵢ`` towards
``1`` (every scaled loss to the same magnitude); the ``−sᵢ`` term forbids ``sᵢ → −∞``. It is
``2·UW`` at ``sᵢ ↦ −sᵢ``. The gradient-balancing half, IMTL-G, is
:class:`jdoptim.aggregation.IMTLG`.

**Training.** As for :class:`~jdoptim.scalarization.UW`: :class:`jdoptim.JDOptimizer` adds the
log-scales to the wrapped optimizer as a new parameter group unless it already holds them.
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
from .uw import check_learned_shape


class IMTLL(DeclaredState, Stateful, Scalarizer):
    r"""``s = Σᵢ e^{sᵢ} ℓᵢ − sᵢ`` with learnable log-scales ``sᵢ`` (``log_scale``).

    Args:
        shape: the shape of the values (an int ``m`` is ``(m,)``).
    """

    def __init__(self, shape: int | Sequence[int]) -> None:
        super().__init__()
        self.log_scale: nn.Parameter
        self.declare_state("log_scale", nn.Parameter(torch.zeros(shape)))  # reset() zeroes it

    def _check(self, values: Tensor) -> None:
        check_learned_shape(self.log_scale, values, "IMTLL")

    def _scalarize(self, values: Tensor) -> Tensor:
        return (torch.exp(self.log_scale) * values - self.log_scale).sum()

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """``s`` and ``wᵢ = e^{sᵢ}``, in floats."""
        losses, scales = floats(values.detach()), floats(self.log_scale.detach())
        weights = [math.exp(s) for s in scales]
        value = math.fsum(w * v - s for w, v, s in zip(weights, losses, scales))
        return value_and_weights(value, weights, values)

    def _learned_gradients(self, values: Tensor) -> list[Tensor] | None:
        """``∂s/∂sᵢ = e^{sᵢ} ℓᵢ − 1`` (with :meth:`_value_and_weights`)."""
        losses, scales = floats(values.detach()), floats(self.log_scale.detach())
        grads = [math.exp(s) * v - 1.0 for v, s in zip(losses, scales)]
        return [tensor_of(grads, self.log_scale).view(self.log_scale.shape)]

    def learnable_parameters(self) -> list[nn.Parameter]:
        return [self.log_scale]

    def extra_repr(self) -> str:
        return f"shape={tuple(self.log_scale.shape)}"
