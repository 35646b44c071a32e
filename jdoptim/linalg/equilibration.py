r"""Diagonal equilibration of a Gramian and the ridge that proves it positive definite.

The quadratic programs on a Gramian ``G = J Jᵀ`` that the methods solve (the dual cone of
UPGrad and DualProj, the simplex of MGDA, CAGrad's and FairGrad's problems) are invariant, or
change in a known way, under a positive diagonal rescaling of the losses. So they are solved on

.. math::  M = D G D + εI, \qquad D = \operatorname{diag}(G_{ii})^{-1/2},

whose unit diagonal keeps gradients of wildly different norms (1e-3 … 1e3) from ruining the
conditioning. Rows with a zero diagonal get the scale of the largest one (an all-zero Gramian
gets ``D = I``). The ridge starts at ``ε = max(reg_eps, m·eps(dtype))``; a Cholesky factorisation
proves ``M`` positive definite, and when it fails (rank deficiency seen through rounding, a
float32 Gramian with slightly negative eigenvalues) ``ε`` is raised 100× and retried, up to
``1e-2``; beyond that the negative eigenvalues are clipped (eigendecomposition) as a last resort.
The same steps exist in numpy (:func:`equilibrated_problem`) and in float64 torch on the
Gramian's device (:func:`equilibrated_problem_torch`); :class:`DualConeInfo` reports what the
solve needed beyond the fast path so that a method can warn once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DEFAULT_REGULARIZATION = 1e-10
_MAX_REGULARIZATION = 1e-2
#: A ridge this many times larger than the initial one is reported as "large".
_LARGE_RIDGE_FACTOR = 1e4
#: Equilibration: a Gramian whose largest diagonal entry is below this is taken as all zero, and
#: a diagonal entry below ``RELATIVE_ZERO_DIAGONAL`` times the largest as a zero gradient.
ZERO_DIAGONAL = 1e-300
RELATIVE_ZERO_DIAGONAL = 1e-30


@dataclass
class DualConeInfo:
    """What a solve on ``M`` needed beyond the fast path: the ridge used, whether it had to grow
    far, whether the spectrum had to be clipped, and how many problems fell back to quadprog."""

    ridge: float = 0.0
    large_ridge: bool = False
    clipped_eigenvalues: bool = False
    n_fallbacks: int = 0

    @property
    def degraded(self) -> bool:
        return self.large_ridge or self.clipped_eigenvalues or self.n_fallbacks > 0

    def describe(self) -> str:
        parts = []
        if self.large_ridge:
            parts.append(f"a ridge of {self.ridge:g} on the equilibrated Gramian")
        if self.clipped_eigenvalues:
            parts.append("clipping its negative eigenvalues (it is not positive semi-definite)")
        if self.n_fallbacks:
            parts.append(f"the quadprog fallback on {self.n_fallbacks} problem(s)")
        return ", ".join(parts)


def normalize_gramian(gramian: np.ndarray) -> np.ndarray:
    """Return ``G / mean(diag(G))`` (or ``G`` itself when its diagonal is all zero)."""
    scale = float(np.trace(gramian)) / max(gramian.shape[0], 1)
    return gramian / scale if scale > 0.0 else gramian


def equilibrate(gramian: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(D G D, diag(D))`` with ``D = diag(Gᵢᵢ)^{-1/2}``.

    Diagonal entries that are zero (or below ``1e-300``, or below ``1e-30·max Gᵢᵢ``) are given the
    scale of the largest one; an all-zero Gramian gets ``D = I``.
    """
    diag = np.diagonal(gramian)
    top = float(diag.max()) if diag.size else 0.0
    if top <= ZERO_DIAGONAL:
        return gramian.copy(), np.ones_like(diag)
    scale = 1.0 / np.sqrt(np.where(diag <= RELATIVE_ZERO_DIAGONAL * top, top, diag))
    return gramian * np.multiply.outer(scale, scale), scale


def regularized_cholesky_safe(matrix: np.ndarray, eps: float) -> tuple[np.ndarray, DualConeInfo]:
    """Return ``M = matrix + ε'I`` positive definite, raising ``ε`` as needed (see the module
    docstring), and what it needed."""
    m = matrix.shape[0]
    info = DualConeInfo()
    current = eps
    while current <= _MAX_REGULARIZATION:
        candidate = matrix.copy()
        candidate.reshape(-1)[:: m + 1] += current
        try:
            np.linalg.cholesky(candidate)
        except np.linalg.LinAlgError:
            current *= 100.0
            continue
        info.ridge = current
        info.large_ridge = current > _LARGE_RIDGE_FACTOR * eps
        return candidate, info
    # Last resort: the matrix is far from positive semi-definite. Clip its spectrum.
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    eigenvalues = np.maximum(eigenvalues, 0.0)
    clipped = (eigenvectors * eigenvalues) @ eigenvectors.T
    info.ridge = eps
    info.clipped_eigenvalues = True
    return 0.5 * (clipped + clipped.T) + eps * np.eye(m), info


def initial_ridge(gramian: Tensor, reg_eps: float) -> float:
    """``ε = max(reg_eps, m·eps(dtype))``, after checking ``reg_eps``."""
    if reg_eps <= 0.0:
        raise ValueError(f"reg_eps must be positive, got {reg_eps}.")
    return max(reg_eps, gramian.shape[0] * _machine_epsilon(gramian.dtype))


@functools.cache
def _machine_epsilon(dtype: torch.dtype) -> float:
    """``torch.finfo(dtype).eps``, kept per dtype (a ``finfo`` is built at every call)."""
    return float(torch.finfo(dtype).eps)


def equilibrated_problem(
    gramian: Tensor, eps: float
) -> tuple[np.ndarray, np.ndarray, DualConeInfo]:
    """``(M, diag(D), info)`` for ``G`` (symmetrised), in float64 numpy on the CPU: the
    equilibration and the ridge of the module docstring."""
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    equilibrated, scale = equilibrate(0.5 * (g + g.T))
    matrix, info = regularized_cholesky_safe(equilibrated, eps)
    return matrix, scale, info


def equilibrated_problem_torch(gramian: Tensor, eps: float) -> tuple[Tensor, Tensor, DualConeInfo]:
    """:func:`equilibrated_problem` in float64 torch on ``gramian``'s device (the same
    equilibration, ridge growth and eigenvalue clipping as :func:`equilibrate` and
    :func:`regularized_cholesky_safe`)."""
    g = gramian.detach().to(torch.float64)
    g = 0.5 * (g + g.T)
    diag = g.diagonal()
    top = float(diag.max())
    if top <= ZERO_DIAGONAL:
        scale = torch.ones_like(diag)
    else:
        scale = torch.where(diag <= RELATIVE_ZERO_DIAGONAL * top, top, diag).rsqrt()
    equilibrated = g * torch.outer(scale, scale)
    identity = torch.eye(g.shape[0], dtype=torch.float64, device=g.device)
    current = eps
    while current <= _MAX_REGULARIZATION:
        candidate = equilibrated + current * identity
        if int(torch.linalg.cholesky_ex(candidate).info) == 0:
            info = DualConeInfo(ridge=current, large_ridge=current > _LARGE_RIDGE_FACTOR * eps)
            return candidate, scale, info
        current *= 100.0
    eigenvalues, eigenvectors = torch.linalg.eigh(equilibrated)
    clipped = (eigenvectors * eigenvalues.clamp(min=0.0)) @ eigenvectors.T
    info = DualConeInfo(ridge=eps, clipped_eigenvalues=True)
    return 0.5 * (clipped + clipped.T) + eps * identity, scale, info
