r"""DualProj: projection of the (preference-weighted) mean gradient onto the dual cone of the
gradients (Quinton & Rey, 2024, "Jacobian Descent for Multi-Objective Optimization",
arXiv:2406.16232, Sec. 5; the idea goes back to the projection step of A-GEM, Chaudhry et al.).

.. math::  d = \pi_C(Jᵀ p) = Jᵀ w, \qquad w = \arg\min_{v ≥ p} vᵀ G v,
           \qquad C = \{x : J x ≥ 0\}.

With the default preference ``p = 1/m``, ``d`` is the projection of the mean gradient: it does not
conflict with any gradient (``J d ≥ 0``), equals the mean gradient when that does not conflict,
and is positively homogeneous (``A(cJ) = c A(J)`` for ``c > 0``). The QP is solved exactly as for
UPGrad (see :mod:`jdoptim.linalg.dual_cone`).
"""

from __future__ import annotations

from torch import Tensor

from ..linalg.equilibration import DEFAULT_REGULARIZATION
from ._bases import GramianWeightedAggregator
from ._mixins import _NonDifferentiable
from ._scaling import scale_free
from .arguments import preference_or_uniform
from .dual_cone_weighting import DualConeWeighting


class DualProjWeighting(DualConeWeighting):
    """Weights of :class:`DualProj` from the Gramian alone: ``w = argmin_{v ≥ p} vᵀGv``.

    Args:
        pref_vector: preference ``p ∈ R^m`` (default ``None``: ``1/m`` for every loss).
        reg_eps: smallest ridge added to the unit-diagonal (equilibrated) Gramian (default
            ``1e-10``), as for :class:`~jdoptim.aggregation.UPGradWeighting`.
    """

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        preference = preference_or_uniform(self.pref_vector, gramian)
        return self._solve(gramian, preference.unsqueeze(0))[0]


class DualProj(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`DualProjWeighting`: ``d = Jᵀ DualProjWeighting(J Jᵀ)``.

    Args:
        pref_vector: see :class:`DualProjWeighting`.
        reg_eps: see :class:`DualProjWeighting`.
    """

    def __init__(
        self, pref_vector: Tensor | None = None, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__(DualProjWeighting(pref_vector, reg_eps))
