"""The base of the weightings that project onto the dual cone of the gradients (UPGrad and
DualProj): a preference vector and the ridge of the quadratic program, solved by
:func:`jdoptim.linalg.dual_cone.solve_dual_cone`.
"""

from __future__ import annotations

from torch import Tensor

from ..linalg.dual_cone import solve_dual_cone
from ..linalg.equilibration import DEFAULT_REGULARIZATION
from ._bases import Weighting
from ._mixins import _NonDifferentiable
from .arguments import check_reg_eps
from .solver_warnings import warn_once_if_degraded
from .state import DeclaredState

__all__ = ["DualConeWeighting"]


class DualConeWeighting(_NonDifferentiable, DeclaredState, Weighting):
    """What UPGrad's and DualProj's weightings share: a preference and the QP's ridge.

    Both are scale-free (``scale_degree = 0``): ``argmin_{v ≥ u} vᵀ(tG)v`` does not depend on
    ``t > 0``, and the ridge is relative to the equilibrated Gramian; their ``forward`` is
    :func:`~jdoptim.aggregation._scaling.scale_free`, so a Gramian at any scale the dtype holds
    (and a float16/bfloat16 one, computed in float32) gives the same weights. Both warn once
    per instance (a declared flag, cleared by ``reset()``) when the QP needed a large ridge.
    """

    scale_degree = 0.0

    def __init__(
        self, pref_vector: Tensor | None = None, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__()
        check_reg_eps(reg_eps)
        self.pref_vector = pref_vector
        self.reg_eps = reg_eps
        self.declare_warning("_warned_ill_conditioned")  # set by warn_once_if_degraded

    def _solve(self, gramian: Tensor, lower_bounds: Tensor) -> Tensor:
        solutions, info = solve_dual_cone(gramian, lower_bounds, self.reg_eps)
        warn_once_if_degraded(self, info, type(self).__name__)
        return solutions

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, reg_eps={self.reg_eps:g}"
