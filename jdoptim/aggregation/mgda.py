r"""MGDA: the Multiple Gradient Descent Algorithm (Désidéri, 2012, "Multiple-gradient descent
algorithm (MGDA) for multiobjective optimization", Comptes Rendus Mathématique 350; used for deep
multi-task learning by Sener & Koltun, 2018, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS).

The update is the minimum-norm point of the convex hull of the gradients:

.. math::  d = Jᵀ w, \qquad w = \arg\min_{w ∈ Δ_m} wᵀ G w, \qquad
           Δ_m = \{w ≥ 0, \textstyle\sum_i w_i = 1\}.

Then ``⟨gᵢ, d⟩ ≥ ‖d‖²`` for every ``i`` (no conflict), ``d = 0`` exactly at Pareto-stationary
points, and ``A(cJ) = c A(J)`` for ``c > 0``.

Solver: the QP is solved **exactly**, rather than with the Frank–Wolfe iterations of Sener &
Koltun's code, as one non-negative linear complementarity problem. On the equilibrated Gramian
``M = D G D + εI`` (``D = diag(Gᵢᵢ)^{-1/2}``, ``w = D w'``, a small ridge ``ε``), the KKT
conditions of ``min w'ᵀMw'`` over ``w' ≥ 0, Σ Dᵢwᵢ' = 1`` are ``Mw' = λD + μ``, ``μ ≥ 0``,
``μᵀw' = 0`` with ``λ = w'ᵀMw' > 0``; so ``v = w'/λ`` solves

.. math::  v ≥ 0, \quad Mv − D ≥ 0, \quad vᵀ(Mv − D) = 0,

and conversely every solution ``v`` gives ``w = Dv / Σ Dᵢvᵢ``. This problem has bounds only (no
equality constraint that could be judged "inconsistent" at large scales); it is solved by the
block principal pivoting of :mod:`._lcp` (one factorisation of the free set per pivot) with a
KKT certificate, and by quadprog where the certificate fails. When the Gramian is
rank-deficient the minimiser ``w`` is not unique; the ridge selects one, and ``d`` (which is
unique) is unaffected up to the ridge. The Gramian is first divided by a power of two near its
largest entry (:mod:`._scaling`), so that any positive rescaling of ``J`` gives the rescaled
answer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..linalg.blas_threads import serial_numpy_blas
from ..linalg.dual_cone import solve_quadprog_lcp
from ..linalg.equilibration import (
    DEFAULT_REGULARIZATION,
    DualConeInfo,
    equilibrate,
    regularized_cholesky_safe,
)
from ..linalg.lcp import solve_nonnegative_lcp
from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import scale_free
from .arguments import check_reg_eps
from .solver_warnings import warn_once_if_degraded
from .state import DeclaredState


def _first_pivot(
    equilibrated: np.ndarray, eps: float, rhs: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(M, v)`` with ``M = equilibrated + εI`` and ``v = M⁻¹ rhs`` by one Cholesky
    factorisation, or ``None`` when ``M`` is not (numerically) positive definite."""
    matrix = equilibrated.copy()
    matrix.reshape(-1)[:: matrix.shape[0] + 1] += eps
    factor, failed = torch.linalg.cholesky_ex(torch.from_numpy(matrix))
    if failed:
        return None
    return matrix, torch.cholesky_solve(torch.from_numpy(rhs)[:, None], factor)[:, 0].numpy()


def min_norm_simplex_weights(gramian: Tensor, reg_eps: float) -> tuple[Tensor, DualConeInfo]:
    """``argmin_{w ∈ Δ_m} wᵀGw`` (exact: the complementarity problem of the module docstring).

    The first block pivot from ``v = 0`` frees every variable (the linear term ``-D`` is
    negative), so the Cholesky factorisation that proves ``M`` positive definite also gives
    that pivot's solution ``M⁻¹D``; when it is positive (all gradients active) it is the answer
    (``Mv − D = 0``). Otherwise the block pivoting takes over on the same ``M``; a ridge that
    must grow goes through :func:`regularized_cholesky_safe`.
    """
    m = gramian.shape[0]
    with serial_numpy_blas(m):
        g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
        equilibrated, scale = equilibrate(0.5 * (g + g.T))
        eps = max(reg_eps, m * float(torch.finfo(gramian.dtype).eps))
        rhs = scale / scale.max()  # D, up to a positive factor that w does not see
        first = _first_pivot(equilibrated, eps, rhs)
        if first is not None:
            matrix, v = first
            info = DualConeInfo(ridge=eps)
        else:
            matrix, info = regularized_cholesky_safe(equilibrated, eps)
            v = np.zeros(m)
        if not (v > 0.0).all():
            solution, certified = solve_nonnegative_lcp(matrix, -rhs[None, :])
            v = solution[0]
            if not certified[0]:
                info.n_fallbacks += 1
                v = solve_quadprog_lcp(matrix, -rhs)
        weights = np.maximum(v, 0.0) * scale
        weights /= weights.sum()
    return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype), info


class MGDAWeighting(_NonDifferentiable, DeclaredState, Weighting):
    """Weights of :class:`MGDA`: ``w = argmin_{w ∈ Δ_m} wᵀGw`` (exact QP).

    Args:
        reg_eps: smallest ridge added to the unit-diagonal (equilibrated) Gramian (default
            ``1e-10``; raised automatically, with a one-time warning, when it is not positive
            definite).
    """

    scale_degree = 0.0

    def __init__(self, reg_eps: float = DEFAULT_REGULARIZATION) -> None:
        super().__init__()
        check_reg_eps(reg_eps)
        self.reg_eps = reg_eps
        self.declare_warning("_warned_ill_conditioned")  # set by warn_once_if_degraded

    @scale_free
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
