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
method with a KKT certificate and a quadprog fallback (see :mod:`jdoptim.aggregation._dual_cone`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting, check_preference
from ._dual_cone import (
    DEFAULT_REGULARIZATION,
    solve_dual_cone,
    solve_upgrad_weights,
    warn_once_if_degraded,
)
from ._mixins import _NonDifferentiable
from ._scaling import scale_free
from ._state import DeclaredState


def _check_reg_eps(reg_eps: float) -> None:
    if not (isinstance(reg_eps, (int, float)) and math.isfinite(reg_eps) and 0.0 < reg_eps < 1.0):
        raise ValueError(f"reg_eps must be a float in (0, 1), got {reg_eps!r}.")


def _preference(pref_vector: Tensor | None, gramian: Tensor) -> Tensor:
    m = gramian.shape[0]
    check_preference(pref_vector, m)
    if pref_vector is None:
        return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    return pref_vector.to(dtype=gramian.dtype, device=gramian.device)


class _DualConeWeighting(_NonDifferentiable, DeclaredState, Weighting):
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
        _check_reg_eps(reg_eps)
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


class UPGradWeighting(_DualConeWeighting):
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
