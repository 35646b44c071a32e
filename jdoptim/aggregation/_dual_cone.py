r"""Projection onto the dual cone of the rows of a Jacobian, in weight space.

For a Jacobian ``J ∈ R^{m×n}`` with Gramian ``G = J Jᵀ``, the dual cone of its rows is
``C = {x : J x ≥ 0}``. The projection of ``Jᵀu`` onto ``C`` is ``Jᵀv`` where ``v`` solves the dual
quadratic program (see the UPGrad paper, Quinton & Rey 2024, Prop. 1)

.. math::  v = \arg\min_{v ≥ u} \; vᵀ G v .

This module solves that QP for several ``u`` at once with quadprog (Goldfarb–Idnani), in float64.
``G`` is normalised by its mean diagonal and regularised by ``ε·I`` so that it is positive definite;
if quadprog still reports an inconsistent problem (rank-deficient, duplicated or zero rows seen
through rounding), ``ε`` is raised by 100× and the solve is retried.
"""

from __future__ import annotations

import warnings

import numpy as np
import quadprog
import torch
from torch import Tensor

DEFAULT_REGULARIZATION = 1e-10
_MAX_REGULARIZATION = 1e-2


def normalize_gramian(gramian: np.ndarray) -> np.ndarray:
    """Return ``G / mean(diag(G))`` (or ``G`` itself when its diagonal is all zero)."""
    scale = float(np.trace(gramian)) / max(gramian.shape[0], 1)
    return gramian / scale if scale > 0.0 else gramian


def solve_dual_cone_quadprog(
    gramian: Tensor, lower_bounds: Tensor, regularization: float = DEFAULT_REGULARIZATION
) -> Tensor:
    r"""Solve ``vᵢ = argmin_{v ≥ uᵢ} vᵀ G v`` for every row ``uᵢ`` of ``lower_bounds``.

    Args:
        gramian: ``G``, shape ``[m, m]``, symmetric positive semi-definite.
        lower_bounds: ``U``, shape ``[k, m]``.
        regularization: initial relative ridge ``ε`` added to the normalised Gramian.

    Returns:
        ``V``, shape ``[k, m]``, on ``gramian``'s device and dtype.
    """
    m = gramian.shape[0]
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    g = normalize_gramian(0.5 * (g + g.T))
    bounds = lower_bounds.detach().to(device="cpu", dtype=torch.float64).numpy()
    constraints = np.eye(m)
    zeros = np.zeros(m)
    solutions = np.empty_like(bounds)
    for row, bound in enumerate(bounds):
        eps = regularization
        while True:
            try:
                solutions[row] = quadprog.solve_qp(g + eps * np.eye(m), zeros, constraints, bound)[
                    0
                ]
                break
            except ValueError as error:
                if eps >= _MAX_REGULARIZATION:
                    raise RuntimeError(
                        f"The dual-cone QP could not be solved even with a ridge of {eps:g}: "
                        f"{error}. The Gramian is probably corrupted (check for overflow)."
                    ) from error
                eps *= 100.0
                if eps >= 1e-6:
                    warnings.warn(
                        f"Ill-conditioned Gramian: the dual-cone QP needed a ridge of {eps:g}.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return torch.from_numpy(solutions).to(device=gramian.device, dtype=gramian.dtype)
