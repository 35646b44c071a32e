r"""FairGrad: α-fair resource allocation in multi-task learning (Ban & Ji, 2024, "Fair Resource
Allocation in Multi-Task Learning", ICML, arXiv:2402.15638).

The update ``d = Jᵀw`` maximises the α-fair utility of the per-task improvements ``gᵢᵀd``; its
optimality condition is the fixed-point equation in the weights

.. math::  G w = w^{-1/α} \quad (\text{elementwise}), \qquad w > 0,

so that ``gᵢᵀd = wᵢ^{-1/α}``. ``α = 1`` is proportional fairness (the same equation as Nash-MTL,
without its normalisation), ``α → ∞`` approaches max-min fairness, ``α → 0`` the plain sum.

Solver: the equation is the stationarity condition of the strictly convex
``½wᵀGw − Σ h(wᵢ)`` with ``h' = w^{-1/α}``; it is solved by a damped Newton method to a backward
error of ``1e-11`` (see :mod:`jdoptim.linalg.power_equation`) instead of the reference code's
``scipy.optimize.least_squares``. As in the paper, ``G`` is not normalised: the weights scale as
``w(c²G) = c^{-2α/(1+α)} w(G)``. A Gramian that is not positive definite (``m > n``, duplicated or
zero rows, opposite gradients) has no solution; the equation is solved for the equilibrated
``DGD`` (``D = diag(Gᵢᵢ)^{-1/2}``, ``w = Dw'``, which turns it into
``DGD w' = D^{1-1/α} w'^{-1/α}``)
plus a ridge ``ε I`` (``ε = reg_eps``, raised automatically when needed, with a one-time warning),
which makes it solvable and gives very large
weights along the null directions (which do not change ``d``). A zero Gramian gives zero weights.

Default ``α = 1``: the paper tunes α per benchmark (values from 0.5 to 10 appear in its
experiments); α = 1 is its proportional-fairness reference point.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..linalg.blas_threads import serial_numpy_blas
from ..linalg.equilibration import equilibrate, regularized_cholesky_safe
from ..linalg.power_equation import DEFAULT_TOL, solve_power_equation
from ..linalg.user_frame import user_stacklevel
from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import scale_free
from .arguments import check_reg_eps
from .solver_warnings import warn_once_if_degraded
from .state import DeclaredState

_DEFAULT_RIDGE = 1e-10


def solve_fair_weights(
    gramian: Tensor, p: float, reg_eps: float, start: Tensor | None, max_iter: int, owner: object
) -> tuple[Tensor, float, bool]:
    """``w > 0`` with ``(G + ridge) w = w^{-p}``; returns ``(w, residual, converged)``.

    Warns once per ``owner`` when a large ridge was needed. ``w`` is on the CPU in float64.
    """
    m = gramian.shape[0]
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    g = 0.5 * (g + g.T)
    if not float(g.trace()) > 0.0:
        return torch.zeros(m, dtype=torch.float64), 0.0, True
    # Equilibrate: with D = diag(Gᵢᵢ)^{-1/2} and w = D w', the equation becomes
    # (DGD) w' = D^{1-p} ⊙ w'^{-p}: unit diagonal, so the ridge is relative to every row.
    with serial_numpy_blas(m):
        equilibrated, scale = equilibrate(g)
        eps = max(reg_eps, m * float(torch.finfo(gramian.dtype).eps))
        matrix, info = regularized_cholesky_safe(equilibrated, eps)
        warn_once_if_degraded(owner, info, type(owner).__name__)
        initial = None if start is None else start.detach().cpu().double().numpy() / scale
        w, _, res = solve_power_equation(
            matrix, p, start=initial, max_iter=max_iter, coef=scale ** (1.0 - p)
        )
        w = w * scale
    return torch.from_numpy(w), res, res <= DEFAULT_TOL


class FairGradWeighting(_NonDifferentiable, DeclaredState, Weighting):
    """Weights of :class:`FairGrad`: the solution ``w > 0`` of ``G w = w^{-1/α}``.

    Args:
        alpha: fairness parameter ``α > 0`` (default ``1.0``, proportional fairness).
        reg_eps: smallest relative ridge ``ε`` (default ``1e-10``).
        max_iter: Newton iterations before giving up (default ``100``; typically 4–20 are used).
            An unconverged solve is never returned silently: it warns with its residual.
    """

    def __init__(
        self, alpha: float = 1.0, reg_eps: float = _DEFAULT_RIDGE, max_iter: int = 100
    ) -> None:
        super().__init__()
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0.0):
            raise ValueError(f"alpha must be a positive finite number, got {alpha!r}.")
        if not (isinstance(max_iter, int) and max_iter >= 1):
            raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
        check_reg_eps(reg_eps)
        self.alpha = float(alpha)
        self.reg_eps = reg_eps
        self.max_iter = max_iter
        self.declare_warning("_warned_ill_conditioned")  # set by warn_once_if_degraded
        # w(tG) = t^{-α/(1+α)} w(G) (module docstring).
        self.scale_degree = -self.alpha / (1.0 + self.alpha)

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        weights, res, converged = solve_fair_weights(
            gramian, 1.0 / self.alpha, self.reg_eps, None, self.max_iter, self
        )
        if not converged:
            warnings.warn(
                f"FairGrad: the Newton solve stopped after {self.max_iter} iterations with a "
                f"backward error of {res:.2e} (target {DEFAULT_TOL:g}); the weights are inexact.",
                RuntimeWarning,
                stacklevel=user_stacklevel(),
            )
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, reg_eps={self.reg_eps:g}, max_iter={self.max_iter}"


class FairGrad(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`FairGradWeighting`: ``d = Jᵀw`` with ``Gw = w^{-1/α}``.

    Args:
        alpha: see :class:`FairGradWeighting`.
        reg_eps: see :class:`FairGradWeighting`.
        max_iter: see :class:`FairGradWeighting`.
    """

    def __init__(
        self, alpha: float = 1.0, reg_eps: float = _DEFAULT_RIDGE, max_iter: int = 100
    ) -> None:
        super().__init__(FairGradWeighting(alpha, reg_eps, max_iter))
