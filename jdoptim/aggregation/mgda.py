r"""MGDA: the Multiple Gradient Descent Algorithm (Désidéri, 2012, "Multiple-gradient descent
algorithm (MGDA) for multiobjective optimization", Comptes Rendus Mathématique 350; used for deep
multi-task learning by Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS).

The update is the minimum-norm point of the convex hull of the gradients:

.. math::  d = Jᵀ w, \qquad w = \arg\min_{w ∈ Δ_m} wᵀ G w, \qquad
           Δ_m = \{w ≥ 0, \textstyle\sum_i w_i = 1\}.

Then ``⟨gᵢ, d⟩ ≥ ‖d‖²`` for every ``i`` (no conflict), ``d = 0`` exactly at Pareto-stationary
points, and ``A(cJ) = c A(J)`` for ``c > 0``.

Solver choice: this QP is solved **exactly** with quadprog (Goldfarb–Idnani dual active set), on
the equilibrated Gramian ``D G D`` (``D = diag(Gᵢᵢ)^{-1/2}``, the constraint becoming
``Σ Dᵢ wᵢ' = 1``) plus a small ridge, rather than with the Frank–Wolfe iterations of Sener &
Koltun's code: the exact solution is as fast at these sizes (one QP of size ``m``) and has no
tolerance or iteration budget to tune. When the Gramian is rank-deficient the minimiser ``w`` is
not unique; the ridge selects one, and ``d`` (which is unique) is unaffected up to the ridge.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._dual_cone import (
    DEFAULT_REGULARIZATION,
    DualConeInfo,
    equilibrate,
    regularized_cholesky_safe,
    warn_once_if_degraded,
)
from ._mixins import _NonDifferentiable
from .upgrad import _check_reg_eps


def min_norm_simplex_weights(gramian: Tensor, reg_eps: float) -> tuple[Tensor, DualConeInfo]:
    """``argmin_{w ∈ Δ_m} wᵀGw`` (exact, quadprog on the equilibrated, regularised Gramian)."""
    m = gramian.shape[0]
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    equilibrated, scale = equilibrate(0.5 * (g + g.T))
    eps = max(reg_eps, m * float(torch.finfo(gramian.dtype).eps))
    matrix, info = regularized_cholesky_safe(equilibrated, eps)
    # Variables w' = D⁻¹ w: constraints Σ Dᵢ wᵢ' = 1 (equality) and w' ≥ 0.
    constraints = np.concatenate([scale[:, None], np.eye(m)], axis=1)
    bounds = np.concatenate([[1.0], np.zeros(m)])
    solution = quadprog.solve_qp(matrix, np.zeros(m), constraints, bounds, meq=1)[0]
    weights = np.maximum(solution, 0.0) * scale
    weights /= weights.sum()
    return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype), info


class MGDAWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`MGDA`: ``w = argmin_{w ∈ Δ_m} wᵀGw`` (exact QP).

    Args:
        reg_eps: smallest ridge added to the unit-diagonal (equilibrated) Gramian (default
            ``1e-10``; raised automatically, with a one-time warning, when it is not positive
            definite).
    """

    def __init__(self, reg_eps: float = DEFAULT_REGULARIZATION) -> None:
        super().__init__()
        _check_reg_eps(reg_eps)
        self.reg_eps = reg_eps

    def forward(self, gramian: Tensor) -> Tensor:
        weights, info = min_norm_simplex_weights(gramian, self.reg_eps)
        warn_once_if_degraded(self, info, type(self).__name__)
        return weights

    def extra_repr(self) -> str:
        return f"reg_eps={self.reg_eps:g}"


class MGDA(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`MGDAWeighting`: the min-norm point of the convex hull of the rows.

    Args:
        reg_eps: see :class:`MGDAWeighting`.
    """

    def __init__(self, reg_eps: float = DEFAULT_REGULARIZATION) -> None:
        super().__init__(MGDAWeighting(reg_eps))
