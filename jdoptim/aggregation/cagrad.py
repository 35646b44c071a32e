r"""CAGrad: Conflict-Averse Gradient descent (Liu, Liu, Jin, Stone & Liu, 2021, "Conflict-Averse
Gradient Descent for Multi-task Learning", NeurIPS).

CAGrad maximises the worst improvement among tasks in a ball around the mean gradient
``g₀ = Jᵀ1/m``:

.. math::  \max_d \min_i \, g_iᵀ d \quad \text{s.t.} \quad ‖d − g_0‖ ≤ c ‖g_0‖ .

Its dual is ``min_{w ∈ Δ_m} bᵀw + s √(wᵀGw)`` with ``b = G1/m`` and ``s = c‖g₀‖ = c√(1ᵀG1)/m``,
and ``d = g₀ + s · Jᵀw / ‖Jᵀw‖``: everything is in the Gramian, so the weights are

.. math::  \text{weights} = \frac{1}{r}\Big(\frac{1}{m}\mathbf 1 + z\Big),
           \qquad z = \frac{s}{‖Jᵀw‖} w ,

where ``r`` is the rescaling divisor below.

Solver (exact, no cvxpy): with ``z`` as unknown, the KKT conditions of the dual are, for some
``λ``, the complementarity problem ``z ≥ 0``, ``Gz + b − λ1 ≥ 0``, ``zᵀ(Gz + b − λ1) = 0``
together with ``zᵀGz = s²``. For fixed ``λ`` the complementarity problem is a bound-constrained
QP, and ``q(λ) = z(λ)ᵀGz(λ)`` is continuous and non-decreasing. On a fixed support ``F``,
``z_F = λG_FF⁻¹1 − G_FF⁻¹b_F`` is affine in ``λ``, so ``q(λ) = s²`` is a quadratic equation. The
solver alternates (i) solving that quadratic on the current support and (ii) re-solving the
complementarity problem at the new ``λ`` (batched block principal pivoting, as for UPGrad) to
update the support, until the KKT conditions hold to ``1e-9``; if that does not settle, a
bisection on ``λ`` (with the same exact inner solve) finishes the job. The problem is solved
in equilibrated variables ``z = Dz'`` (``D = diag(Gᵢᵢ)^{-1/2}``: ``DGD`` has a unit diagonal,
``1`` becomes ``diag(D)``) with a ridge ``reg_eps·I``, so that gradients of very different norms
keep their accuracy. When a gradient is zero (or ``0`` is in the convex hull of the gradients),
the dual optimum may put its weight where ``Jᵀw = 0``; then ``d = g₀`` (before rescaling), as
with the authors' code, whose ``‖Jᵀw‖`` carries a ``+1e-4``.

Hyperparameters: ``c = 0.4`` (default; the paper uses 0.4 for NYU-v2 and CityScapes and 0.5 for
Meta-World), ``rescale = 1`` (default, as in the authors' code): the update is divided by
``1 + c²``; ``rescale = 2`` divides by ``1 + c``, ``rescale = 0`` leaves it (the paper's
formula). ``c = 0`` gives the mean gradient. The weights are invariant to scaling ``G``, so
``A(cJ) = c A(J)``; they are permutation equivariant.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import Tensor

from ..linalg.blas_threads import serial_numpy_blas
from ..linalg.equilibration import (
    DEFAULT_REGULARIZATION,
    equilibrate,
    normalize_gramian,
    regularized_cholesky_safe,
)
from ..linalg.lcp import solve_nonnegative_lcp
from ..linalg.user_frame import user_stacklevel
from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import scale_free
from .arguments import check_reg_eps
from .solver_warnings import warn_once_if_degraded
from .state import DeclaredState

_KKT_TOL = 1e-9


def _lcp(matrix: np.ndarray, linear: np.ndarray) -> np.ndarray:
    z, certified = solve_nonnegative_lcp(matrix, linear[None, :])
    if not certified[0]:
        import quadprog

        m = matrix.shape[0]
        return quadprog.solve_qp(matrix, -linear, np.eye(m), np.zeros(m))[0]
    return z[0]


def _kkt_ok(
    matrix: np.ndarray, b: np.ndarray, e: np.ndarray, lam: float, z: np.ndarray, s2: float
) -> bool:
    y = matrix @ z + b - lam * e
    scale = 1.0 + abs(lam) * float(e.max()) + float(np.abs(b).max())
    complementary = np.where(z > 0, np.abs(y), 0.0).max() <= _KKT_TOL * scale
    norm_ok = abs(float(z @ matrix @ z) - s2) <= _KKT_TOL * max(s2, 1e-300) * 10
    return bool((z >= 0).all() and (y >= -_KKT_TOL * scale).all() and complementary and norm_ok)


def _solve_on_support(
    matrix: np.ndarray, b: np.ndarray, e: np.ndarray, support: np.ndarray, s2: float
) -> tuple[float, np.ndarray] | None:
    sub = matrix[np.ix_(support, support)]
    a = np.linalg.solve(sub, e[support])
    c = np.linalg.solve(sub, b[support])
    qa, qb, qc = float(e[support] @ a), float(e[support] @ c), float(b[support] @ c) - s2
    disc = qb * qb - qa * qc
    if qa <= 0.0 or disc < 0.0:
        return None
    lam = (qb + math.sqrt(disc)) / qa
    z = np.zeros_like(b)
    z[support] = lam * a - c
    return lam, z


def cagrad_z(
    matrix: np.ndarray, b: np.ndarray, e: np.ndarray, s2: float
) -> tuple[np.ndarray, bool]:
    """Solve ``z ≥ 0, Mz + b − λe ≥ 0, zᵀ(Mz + b − λe) = 0, zᵀMz = s²`` for ``(z, λ)``.

    ``e > 0`` is ``1`` for the plain problem and ``diag(D)`` for its equilibrated form. Returns
    ``(z, used_bisection)``.
    """
    m = len(b)
    support = np.zeros(m, dtype=bool)
    support[int(np.argmin(b / e))] = True
    for _ in range(2 * m + 10):
        solved = _solve_on_support(matrix, b, e, support, s2)
        if solved is None:
            break
        lam, z = solved
        if _kkt_ok(matrix, b, e, lam, z, s2):
            return z, False
        new_support = _lcp(matrix, b - lam * e) > 0
        if not new_support.any() or (new_support == support).all():
            break
        support = new_support
    # Safeguard: bisection on λ, q(λ) = z(λ)ᵀMz(λ) being non-decreasing.
    low = float((b / e).min())
    step = max(1.0, float(np.abs(b / e).max()))
    high = low + step
    while float((z_high := _lcp(matrix, b - high * e)) @ matrix @ z_high) < s2:
        step *= 2.0
        high = low + step
    for _ in range(200):
        mid = 0.5 * (low + high)
        z_mid = _lcp(matrix, b - mid * e)
        if float(z_mid @ matrix @ z_mid) < s2:
            low = mid
        else:
            high = mid
        if high - low <= 1e-15 * max(abs(high), 1.0):
            break
    z = _lcp(matrix, b - high * e)
    return z, True


class CAGradWeighting(_NonDifferentiable, DeclaredState, Weighting):
    """Weights of :class:`CAGrad`: ``(1/m + z) / r`` (see the module docstring).

    Args:
        c: radius of the ball around the mean gradient, relative to its norm (default ``0.4``).
        rescale: ``1`` (default) divides the update by ``1 + c²``, ``2`` by ``1 + c``, ``0``
            does not rescale.
        reg_eps: ridge added to the normalised Gramian (default ``1e-10``).
    """

    def __init__(
        self, c: float = 0.4, rescale: int = 1, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__()
        if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0.0):
            raise ValueError(f"c must be a finite number ≥ 0, got {c!r}.")
        if rescale not in (0, 1, 2):
            raise ValueError(f"rescale must be 0, 1 or 2, got {rescale!r}.")
        check_reg_eps(reg_eps)
        self.c = float(c)
        self.rescale = rescale
        self.reg_eps = reg_eps
        self.declare_warning("_warned_ill_conditioned")  # set by warn_once_if_degraded
        self._warned_bisection: bool
        self.declare_warning("_warned_bisection")

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        with serial_numpy_blas(m):
            g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
            g = normalize_gramian(0.5 * (g + g.T))
            mean = np.full(m, 1.0 / m)
            b = g @ mean
            s2 = self.c**2 * float(mean @ b)
            weights = mean.copy()
            if s2 > 0.0:
                # Equilibrate: z = D z' with D = diag(Gᵢᵢ)^{-1/2} (see the module docstring).
                equilibrated, scale = equilibrate(g)
                eps = max(self.reg_eps, m * float(torch.finfo(gramian.dtype).eps))
                matrix, info = regularized_cholesky_safe(equilibrated, eps)
                warn_once_if_degraded(self, info, type(self).__name__)
                z_scaled, bisected = cagrad_z(matrix, scale * b, scale, s2)
                z = scale * z_scaled
                if bisected and not self._warned_bisection:
                    self._warned_bisection = True
                    warnings.warn(
                        "CAGrad: the active-set solve did not settle; used bisection "
                        "(warned once).",
                        RuntimeWarning,
                        stacklevel=user_stacklevel(),
                    )
                weights = weights + z
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        return torch.from_numpy(weights / divisor).to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return f"c={self.c:g}, rescale={self.rescale}, reg_eps={self.reg_eps:g}"


class CAGrad(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`CAGradWeighting`.

    Args:
        c: see :class:`CAGradWeighting`.
        rescale: see :class:`CAGradWeighting`.
        reg_eps: see :class:`CAGradWeighting`.
    """

    def __init__(
        self, c: float = 0.4, rescale: int = 1, reg_eps: float = DEFAULT_REGULARIZATION
    ) -> None:
        super().__init__(CAGradWeighting(c, rescale, reg_eps))
