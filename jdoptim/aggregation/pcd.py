r"""PCD: Priority-Constrained Descent ("Not All Objectives Are Born Equal: Priority-Constrained
Descent for Hierarchical Multi-Objective Optimization", TMLR 2026, arXiv:2606.29521).

The first loss is *primary*; the others are *secondary*. With normalised gradients
``g̃ᵢ = sᵢ gᵢ``, ``sᵢ = 1/√(v̂ᵢ + ε)`` where ``v̂ᵢ`` is the bias-corrected exponential moving
average (decay ``β``) of ``‖gᵢ‖²`` over the calls, PCD follows the primary gradient as closely as
the secondaries allow:

.. math::  \tilde d = \arg\min_d \tfrac12 \lVert d - \tilde g_1 \rVert^2 \quad\text{s.t.}\quad
           \tilde g_jᵀ d \ge τ_j \lVert \tilde g_j \rVert^2, \quad j = 2, …, m,

(each secondary gets at least a fraction ``τ_j`` of the first-order progress of a step along its
own normalised gradient), and the update is ``d̃`` rescaled to the norm of ``g₁``.

**Gramian form.** By the KKT conditions ``d̃ = g̃₁ + Σⱼ μⱼ g̃ⱼ`` with multipliers ``μ ≥ 0``, so
``d = Σᵢ wᵢ gᵢ`` with ``w = μ̄ ∘ s · ‖g₁‖/‖d̃‖``, ``μ̄ = (1, μ₂, …, μₘ)`` and
``‖d̃‖² = μ̄ᵀ G̃ μ̄``, ``G̃ = diag(s) G diag(s)``. The QP lives in the span of the gradients:
with a factor ``F`` (``F Fᵀ = G̃``, from the eigendecomposition, rank ``r``) it is the
``r``-dimensional problem ``min ½‖x − F₁‖²`` s.t. ``Fⱼᵀx ≥ τⱼ G̃ⱼⱼ``, solved exactly by
``quadprog`` (an active-set method), whose Lagrange multipliers are ``μ``.

**Special cases** (as in the paper and TorchJD): ``g₁ = 0`` gives ``w = 0``; infeasible
constraints (only possible for ``m ≥ 3``, e.g. two opposite secondaries with ``τ > 0``) are
dropped, ``w = e₁``; a ``d̃`` that vanishes to rounding gives ``w = 0``.

**State**: the moving average and the step count (``state_dict``, :meth:`PCDWeighting.reset`).
Unlike TorchJD, which silently restarts the average, a change in the number of losses raises.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..linalg.blas_threads import serial_numpy_blas
from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import Stateful, _NonDifferentiable
from .state import CheckpointedState, DeclaredState


def _check_tau(tau: float | Tensor) -> None:
    if isinstance(tau, Tensor):
        ok = tau.dim() == 1 and bool(((tau >= 0) & (tau <= 1)).all())
    else:
        ok = 0.0 <= tau <= 1.0
    if not ok:
        raise ValueError(f"`tau` must be a float or a 1-D tensor of entries in [0, 1], got {tau}.")


def _factor(gramian: np.ndarray) -> np.ndarray:
    """``F`` with ``F Fᵀ = G`` and full column rank (eigenvalues below ``1e-12·λ_max`` dropped)."""
    eigenvalues, eigenvectors = np.linalg.eigh(0.5 * (gramian + gramian.T))
    top = max(float(eigenvalues.max(initial=0.0)), 0.0)
    keep = eigenvalues > 1e-12 * top
    return eigenvectors[:, keep] * np.sqrt(eigenvalues[keep])


def pcd_multipliers(gramian: np.ndarray, taus: np.ndarray) -> np.ndarray | None:
    """``(1, μ₂, …, μₘ)`` solving PCD's QP on the (normalised) Gramian; ``None`` if infeasible."""
    import quadprog  # a dependency of jdoptim; imported when used

    m = gramian.shape[0]
    weights = np.zeros(m)
    weights[0] = 1.0
    active = [j for j in range(1, m) if gramian[j, j] > 0.0]  # zero gradients: 0 ≥ 0 holds
    factor = _factor(gramian)
    if not active or factor.shape[1] == 0:
        return weights
    constraints = factor[active].T  # r × k: Cᵀx ≥ b
    bounds = taus[np.array(active) - 1] * gramian[active, active]
    try:
        result = quadprog.solve_qp(
            np.eye(factor.shape[1]), factor[0].copy(), np.ascontiguousarray(constraints), bounds
        )
    except ValueError:  # quadprog: "constraints are inconsistent, no solution"
        return None
    weights[active] = np.maximum(result[4], 0.0)
    return weights


class PCDWeighting(_NonDifferentiable, CheckpointedState, Stateful, Weighting):
    """Weights of :class:`PCD` from the Gramian (see the module docstring).

    Args:
        tau: the guaranteed fraction ``τ ∈ [0, 1]`` of normalised progress of every secondary
            loss (a float), or one per secondary loss (a 1-D tensor of length ``m − 1``).
            Default ``0.02``.
        beta: decay ``β ∈ [0, 1)`` of the moving average of ``‖gᵢ‖²`` (default ``0.999``).
        eps: ``ε ≥ 0`` added to the average before its inverse square root (default ``1e-8``).
    """

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        _check_tau(tau)
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1), got {beta}.")
        if not eps >= 0.0:
            raise ValueError(f"`eps` must be non-negative, got {eps}.")
        super().__init__()
        self.tau = tau
        self.beta = float(beta)
        self.eps = float(eps)
        self._average: Tensor | None  # EMA of ‖gᵢ‖², float64
        self._steps: int
        self.declare_state("_average", None)
        self.declare_state("_steps", 0, convert=int)

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        g = gramian.detach().to(device="cpu", dtype=torch.float64)
        taus = self._taus(m)
        scales = self._scales(g.diagonal())
        weights = torch.zeros(m, dtype=torch.float64)
        if m and g[0, 0] > 0.0:
            normalized = (g * torch.outer(scales, scales)).numpy()
            with serial_numpy_blas(m):
                multipliers = pcd_multipliers(normalized, taus.numpy())
            if multipliers is None:  # infeasible: the constraints are dropped, d = g₁
                multipliers = np.eye(m)[0]
            w = torch.from_numpy(multipliers)
            squared_norm = w @ torch.from_numpy(normalized) @ w
            magnitude = (w.abs() @ torch.from_numpy(normalized).diagonal().sqrt()) ** 2
            if squared_norm > 10.0 * torch.finfo(gramian.dtype).eps * magnitude:
                weights = w * scales * (g[0, 0] / squared_norm).sqrt()
        return weights.to(device=gramian.device, dtype=gramian.dtype)

    def _taus(self, m: int) -> Tensor:
        if isinstance(self.tau, Tensor):
            if self.tau.shape[0] != m - 1:
                raise ValueError(
                    f"`tau` has {self.tau.shape[0]} entries but there are {m - 1} secondary "
                    "losses: give one per secondary loss (the first loss is the primary one)."
                )
            return self.tau.detach().to(device="cpu", dtype=torch.float64)
        return torch.full((max(m - 1, 0),), float(self.tau), dtype=torch.float64)

    def _scales(self, squared_norms: Tensor) -> Tensor:
        """Update the moving average with ``‖gᵢ‖²`` and return ``sᵢ = 1/√(v̂ᵢ + ε)``."""
        if self._average is None:
            self._average = torch.zeros_like(squared_norms)
        elif self._average.shape != squared_norms.shape:
            raise ValueError(
                f"PCD was used with {self._average.shape[0]} losses and now receives "
                f"{squared_norms.shape[0]}: its moving average is per loss. Call reset() first."
            )
        self._average = self.beta * self._average + (1.0 - self.beta) * squared_norms
        self._steps += 1
        unbiased = self._average / (1.0 - self.beta**self._steps)
        roots = (unbiased + self.eps).sqrt()
        return torch.where(roots > 0.0, 1.0 / torch.where(roots > 0.0, roots, 1.0), 0.0)

    def extra_repr(self) -> str:
        tau = self.tau.tolist() if isinstance(self.tau, Tensor) else self.tau
        return f"tau={tau}, beta={self.beta:g}, eps={self.eps:g}"


class PCD(_NonDifferentiable, DeclaredState, Stateful, GramianWeightedAggregator):
    """Priority-Constrained Descent: ``d = Jᵀ PCDWeighting(J Jᵀ)``; the first row is primary.

    Args: see :class:`PCDWeighting`.
    """

    weighting: PCDWeighting

    def __init__(self, tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> None:
        super().__init__(PCDWeighting(tau, beta, eps))
