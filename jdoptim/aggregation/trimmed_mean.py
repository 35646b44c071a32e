r"""Coordinate-wise trimmed mean (Yin, Chen, Ramchandran & Bartlett, 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML, arXiv:1803.01498).

For every coordinate ``k``, sort the ``m`` values ``J_{1k}, …, J_{mk}``, drop the ``t`` largest and
the ``t`` smallest (``t = trim_number``) and average the ``m - 2t`` that remain:

.. math::  d_k = \frac{1}{m - 2t} \sum_{r = t+1}^{m-t} J_{(r)k}.

``t = 0`` is the mean. It needs ``m > 2t`` losses. Coordinate-wise, so it is an
:class:`~jdoptim.aggregation.Aggregator` only (:class:`jdoptim.JDOptimizer` computes the Jacobian
for it). Treated as non-differentiable (the selection is a sort).
"""

from __future__ import annotations

from torch import Tensor

from ._bases import Aggregator
from ._mixins import _NonDifferentiable


class TrimmedMean(_NonDifferentiable, Aggregator):
    """Coordinate-wise trimmed mean (see the module docstring).

    Args:
        trim_number: how many of the largest and how many of the smallest values to drop per
            coordinate (no default: it is the number of outliers the method tolerates).
    """

    def __init__(self, trim_number: int) -> None:
        if isinstance(trim_number, bool) or not isinstance(trim_number, int) or trim_number < 0:
            raise ValueError(f"`trim_number` must be a non-negative int, got {trim_number!r}.")
        super().__init__()
        self.trim_number = trim_number

    def forward(self, matrix: Tensor) -> Tensor:
        m = matrix.shape[0]
        t = self.trim_number
        if m <= 2 * t:
            raise ValueError(
                f"TrimmedMean(trim_number={t}) drops {2 * t} values per coordinate and needs more "
                f"than {2 * t} losses, got {m}."
            )
        return matrix.sort(dim=0).values[t : m - t].mean(dim=0)

    def extra_repr(self) -> str:
        return f"trim_number={self.trim_number}"
