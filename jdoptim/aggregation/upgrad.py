r"""UPGrad: Unconflicting Projection of Gradients (Quinton & Rey, 2024, "Jacobian Descent for
Multi-Objective Optimization", arXiv:2406.16232).

Each gradient ``gᵢ`` (row of ``J``), scaled by its preference ``pᵢ``, is projected onto the dual
cone ``C = {x : J x ≥ 0}`` of all the rows, and the projections are summed:

.. math::  d = \sum_i \pi_C(p_i g_i) = Jᵀ w, \qquad
           w = \sum_i v_i, \quad v_i = \arg\min_{v ≥ p_i e_i} vᵀ G v .

With the default preference ``p = 1/m`` this is the mean of the projected gradients: ``d`` does not
conflict with any gradient (``J d ≥ 0``), equals the mean gradient when no two gradients conflict,
and is positively homogeneous (``A(cJ) = c A(J)`` for ``c > 0``).

The ``m`` quadratic programs share ``G`` and are solved together by an exact batched active-set
method with a KKT certificate and a quadprog fallback (see :mod:`jdoptim.linalg.dual_cone`;
the weighting here owns the preference, the argument checks and the warn-once report).
"""

from __future__ import annotations

from torch import Tensor

from ..linalg.dual_cone import solve_upgrad_weights
from ..linalg.equilibration import DEFAULT_REGULARIZATION
from ._bases import GramianWeightedAggregator, check_preference
from ._mixins import _NonDifferentiable
from ._scaling import scale_free
from .dual_cone_weighting import DualConeWeighting
from .solver_warnings import warn_once_if_degraded


class UPGradWeighting(DualConeWeighting):
    """Weights of :class:`UPGrad` from the Gramian alone: ``w = Σᵢ argmin_{v ≥ pᵢeᵢ} vᵀGv``.

    Args:
        pref_vector: preference ``p ∈ R^m`` (default ``None``: ``1/m`` for every loss, as in the
            paper's experiments).
        reg_eps: smallest ridge added to the unit-diagonal (equilibrated) Gramian before solving
            the QPs (default ``1e-10``; raised automatically when the Gramian is numerically
            indefinite, with a one-time warning when it had to be raised far).
    """

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        check_preference(self.pref_vector, gramian.shape[0])
        weights, info = solve_upgrad_weights(gramian, self.pref_vector, self.reg_eps)
        warn_once_if_degraded(self, info, type(self).__name__)
        return weights


class UPGrad(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`UPGradWeighting`: ``d = Jᵀ UPGradWeighting(J Jᵀ)``.

    Args:
        pref_vector: see :class:`UPGradWeighting`.
        reg_eps: see :class:`UPGradWeighting`.
    """

    def __init__(
        self, pref_vector: Tensor | None = None, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__(UPGradWeighting(pref_vector, reg_eps))
