r"""UPGrad: Unconflicting Projection of Gradients (Quinton & Rey, 2024, "Jacobian Descent for
Multi-Objective Optimization", arXiv:2406.16232).

Each gradient ``gᵢ`` (row of ``J``), scaled by its preference ``pᵢ``, is projected onto the dual
cone ``{x : J x ≥ 0}`` of all the rows, and the projections are summed:

.. math::  d = \sum_i \pi_C(p_i g_i) = Jᵀ w, \qquad
           w = \sum_i v_i, \quad v_i = \arg\min_{v ≥ p_i e_i} vᵀ G v .

With the default preference ``p = 1/m`` this is the mean of the projected gradients: ``d`` does not
conflict with any gradient (``J d ≥ 0``), and equals the mean gradient when no two gradients
conflict.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting, check_preference
from ._dual_cone import DEFAULT_REGULARIZATION, solve_dual_cone_quadprog
from ._mixins import _NonDifferentiable


class UPGradWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`UPGrad` from the Gramian alone.

    Args:
        pref_vector: preference ``p ∈ R^m`` (default: ``1/m`` for every loss).
        reg_eps: relative ridge added to the normalised Gramian before solving the QPs.
    """

    def __init__(
        self, pref_vector: Tensor | None = None, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        check_preference(self.pref_vector, m)
        if self.pref_vector is None:
            preference = torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
        else:
            preference = self.pref_vector.to(dtype=gramian.dtype, device=gramian.device)
        lower_bounds = torch.diag(preference)
        return solve_dual_cone_quadprog(gramian, lower_bounds, self.reg_eps).sum(dim=0)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, reg_eps={self.reg_eps:g}"


class UPGrad(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`UPGradWeighting`: ``d = Jᵀ UPGradWeighting(J Jᵀ)``."""

    def __init__(
        self, pref_vector: Tensor | None = None, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, reg_eps))
