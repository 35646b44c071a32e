"""Independent reference computations for the tests of the projection and balancing methods.

Everything here works from the Jacobian ``J`` (not the Gramian) or from a general-purpose solver
(cvxpy, quadprog, scipy), so that it does not share code or formulation with the library.
"""

from __future__ import annotations

import cvxpy as cp
import numpy as np
import quadprog
import torch
from torch import Tensor


def project_onto_dual_cone(jacobian: Tensor, vector: np.ndarray) -> np.ndarray:
    """Primal definition: ``argmin_x ‖x − y‖²`` subject to ``J x ≥ 0`` (cvxpy, Clarabel)."""
    j = jacobian.detach().double().numpy()
    scale = max(float(np.abs(j).max()), 1e-300)
    j_n = j / scale
    x = cp.Variable(j.shape[1])
    problem = cp.Problem(cp.Minimize(cp.sum_squares(x - vector)), [j_n @ x >= 0])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return np.asarray(x.value)


def min_norm_convex_hull(jacobian: Tensor) -> np.ndarray:
    """``argmin ‖Jᵀw‖`` over the simplex, returned as the point ``Jᵀw`` (cvxpy, Clarabel)."""
    j = jacobian.detach().double().numpy()
    scale = max(float(np.abs(j).max()), 1e-300)
    w = cp.Variable(j.shape[0])
    problem = cp.Problem(cp.Minimize(cp.sum_squares(j.T @ w / scale)), [w >= 0, cp.sum(w) == 1])
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    return j.T @ np.asarray(w.value)


def relative_error(actual: Tensor | np.ndarray, expected: Tensor | np.ndarray) -> float:
    a = torch.as_tensor(np.asarray(actual), dtype=torch.float64)
    e = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    return float((a - e).norm() / max(float(e.norm()), 1e-300))


def conflict(jacobian: Tensor, direction: Tensor) -> float:
    """The worst conflict ``min_i ⟨gᵢ, d⟩ / (‖gᵢ‖ · max_j ‖gⱼ‖)`` (negative means a conflict).

    Measured against the largest gradient norm (the scale of ``d``) rather than ``‖d‖`` so that a
    ``d`` that is zero up to rounding does not look like a conflict.
    """
    j = jacobian.double()
    d = direction.double()
    norms = j.norm(dim=1)
    top = float(norms.max())
    nonzero = norms > 0
    if not nonzero.any():
        return 0.0
    return float(((j @ d)[nonzero] / (norms[nonzero] * top)).min())


def solve_dual_cone_quadprog(
    gramian: Tensor, lower_bounds: Tensor, regularization: float = 1e-10
) -> Tensor:
    r"""``vᵢ = argmin_{v ≥ uᵢ} vᵀ G v`` for every row ``uᵢ`` of ``lower_bounds``: one quadprog
    (Goldfarb–Idnani) call per row on the primal QP, not the complementarity problem the library
    solves.

    ``G`` is symmetrised, divided by its mean diagonal (the minimiser does not depend on a
    positive factor) and given a ridge ``ε·I``; ``ε`` is raised 100× (up to ``1e-2``) while
    quadprog reports the problem inconsistent. Moved here from the library, which never used it.
    """
    m = gramian.shape[0]
    g = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    g = 0.5 * (g + g.T)
    mean_diagonal = float(np.trace(g)) / max(m, 1)
    if mean_diagonal > 0.0:
        g = g / mean_diagonal
    bounds = lower_bounds.detach().to(device="cpu", dtype=torch.float64).numpy()
    solutions = np.empty_like(bounds)
    for row, bound in enumerate(bounds):
        eps = regularization
        while True:
            try:
                solutions[row] = quadprog.solve_qp(
                    g + eps * np.eye(m), np.zeros(m), np.eye(m), bound
                )[0]
                break
            except ValueError as error:
                if eps >= 1e-2:
                    raise RuntimeError(f"quadprog failed even with a ridge of {eps:g}") from error
                eps *= 100.0
    return torch.from_numpy(solutions).to(device=gramian.device, dtype=gramian.dtype)
