r"""Projection onto the dual cone of the rows of a Jacobian, in weight space.

For a Jacobian ``J ∈ R^{m×n}`` with Gramian ``G = J Jᵀ``, the dual cone of its rows is
``C = {x : J x ≥ 0}``. The projection of ``Jᵀu`` onto ``C`` is ``Jᵀv`` where ``v`` solves the dual
quadratic program (Quinton & Rey 2024, "Jacobian Descent for Multi-Objective Optimization",
arXiv:2406.16232, Prop. 1)

.. math::  v = \arg\min_{v ≥ u} \; vᵀ G v .

How it is solved (:func:`solve_dual_cone`), for ``k`` lower bounds ``u`` sharing one ``G``:

1. **Equilibration and ridge** (:mod:`.equilibration`). With ``D = diag(Gᵢᵢ)^{-1/2}``,
   ``v = D v'`` turns the problem into the same problem for ``G' = D G D`` (unit diagonal) and
   bounds ``u' = D⁻¹u``: the QP is invariant under positive diagonal rescaling, so gradients of
   wildly different norms (1e-3 … 1e3) do not ruin the conditioning. Then ``M = G' + εI`` with
   ``ε = max(reg_eps, m·eps(dtype))``, raised until a Cholesky factorisation proves ``M``
   positive definite (its negative eigenvalues clipped as a last resort).
2. **Batched exact active-set solve.** With ``v' = u' + z``, the QP is the linear
   complementarity problem ``z ≥ 0, y = M z + M u' ≥ 0, zᵀy = 0``. All ``k`` problems are solved
   together by block principal pivoting (:mod:`.lcp`: Júdice & Pires 1994, with Kim & Park's
   anti-cycling rule), which terminates at the exact solution of the regularised problem.
   Problems whose first pivot frees the same variables (UPGrad: a group of agreeing losses)
   continue on the principal pivot transform of ``M`` on that set, where each later pivot solves
   a system of the size of the change of free set only. UPGrad with :data:`TORCH_FROM` losses or
   more (per-sample losses), and any Gramian off the CPU, takes the batched torch solver of
   :mod:`.batched_lcp` instead, on the Gramian's device (a float32 search for the free sets,
   then one float64 solve on them and the same certificate).
3. **Certificate.** The KKT conditions (``z ≥ 0``, ``y ≥ 0``, ``y_F = 0`` on the free set) are
   checked to a relative tolerance; every problem that is not certified is re-solved with
   quadprog (Goldfarb–Idnani), which is also the reference solver of the tests.

From :data:`~.blas_threads.SERIAL_FROM` losses on, the numpy steps run with numpy's BLAS on one
thread (:mod:`.blas_threads`: right after a step's products its own thread pool would wait for
cores that torch's OpenMP threads hold).

**A few losses** (:func:`_solve_tiny`: ``m ≤`` :data:`~.small_lcp.PLAIN_PYTHON_UP_TO`, the
commonest case in multi-task learning and in per-sample steps of small batches) skip the array
machinery: the same equilibration and ridge in plain Python arithmetic, then, for one or two
losses, the ``2^m`` candidate free sets are tried and the one satisfying the KKT conditions is
taken (for a positive definite ``M`` exactly one solution exists); for three to six, the block
pivoting of :mod:`.small_lcp` with the same certificate as the array solver's. Any case off that
path (the ridge would have to grow, or rounding leaves no solution certified) goes through the
general solver. This matters because a step of a training loop runs the QP right after large
matrix products, when every small array operation costs several microseconds more than in a
warm loop (UPGrad at ``m = 4``: 107 against 486 µs after a large product).

The solver reports what it had to do (:class:`DualConeInfo`) so that the caller can warn once
rather than on every step.

:func:`solve_upgrad_weights` (the sum of the solutions for the bounds ``diag(p)``) is numerics
too: it shares the tiny path and the certified solve with :func:`solve_dual_cone` and knows
nothing of a method. The weightings built on these solves (argument checks, preferences, the
warn-once report) live in :mod:`jdoptim.aggregation`.
"""

from __future__ import annotations

import math

import numpy as np
import quadprog
import torch
from torch import Tensor

from .batched_lcp import solve_lcp_batched
from .blas_threads import serial_numpy_blas
from .equilibration import (
    DEFAULT_REGULARIZATION,
    RELATIVE_ZERO_DIAGONAL,
    ZERO_DIAGONAL,
    DualConeInfo,
    equilibrated_problem,
    equilibrated_problem_torch,
    initial_ridge,
)
from .lcp import solve_nonnegative_lcp
from .small_lcp import PLAIN_PYTHON_UP_TO, SmallLCP, cholesky

__all__ = [
    "DEFAULT_REGULARIZATION",
    "TORCH_FROM",
    "DualConeInfo",
    "solve_dual_cone",
    "solve_quadprog_lcp",
    "solve_upgrad_weights",
]

#: From this many losses on (and always for a Gramian off the CPU), UPGrad's ``m`` problems are
#: solved by the batched torch solver (:mod:`.batched_lcp`) on the Gramian's device; below it,
#: the numpy solver (:mod:`.lcp`), tuned for few array operations, is faster. Set from timings
#: inside training steps (per-sample UPGrad, Llama small and GPT-2 tiny, 2 threads, in ms, numpy
#: against torch): 3.1 / 3.1 and 4.5 / 6.1 at 64 losses, 5.6 / 5.9 at 80, 12.5 / 8.8 and
#: 11.4 / 10.8 at 96, 27 / 19 at 128. (It was 192, from timings of the solve alone, in a loop,
#: where the numpy solver's small arrays stay in the caches.)
TORCH_FROM = 96


def solve_quadprog_lcp(matrix: np.ndarray, linear: np.ndarray) -> np.ndarray:
    """``argmin_{z ≥ 0} ½ zᵀ M z + qᵀ z`` with quadprog (Goldfarb–Idnani), for one ``q``."""
    m = matrix.shape[0]
    return quadprog.solve_qp(matrix, -linear, np.eye(m), np.zeros(m))[0]


def _tiny_nonnegative_lcp(matrix: list[list[float]], linear: list[float]) -> list[float] | None:
    """``argmin_{z ≥ 0} ½ zᵀ M z + qᵀ z`` for ``m ≤ 2`` by trying every free set, or ``None``
    when rounding leaves no candidate that satisfies the KKT conditions exactly."""
    if len(linear) == 1:
        (q,) = linear
        return [-q / matrix[0][0] if q < 0.0 else 0.0]
    (a, c), (_, b) = matrix
    q0, q1 = linear
    if q0 >= 0.0 and q1 >= 0.0:  # F = {}: z = 0, y = q
        return [0.0, 0.0]
    z0 = -q0 / a  # F = {0}
    if z0 >= 0.0 and c * z0 + q1 >= 0.0:
        return [z0, 0.0]
    z1 = -q1 / b  # F = {1}
    if z1 >= 0.0 and c * z1 + q0 >= 0.0:
        return [0.0, z1]
    det = a * b - c * c  # F = {0, 1}: z = -M⁻¹ q
    z0, z1 = (c * q1 - b * q0) / det, (c * q0 - a * q1) / det
    if z0 >= 0.0 and z1 >= 0.0:
        return [z0, z1]
    return None


def _solve_tiny(
    gramian: list[list[float]], bounds: list[list[float]], eps: float
) -> list[list[float]] | None:
    """:func:`solve_dual_cone` for ``m ≤`` :data:`.small_lcp.PLAIN_PYTHON_UP_TO` in plain Python
    (see the module docstring), or ``None`` where the general solver must take over."""
    m = len(gramian)
    diag = [gramian[i][i] for i in range(m)]
    top = max(diag)
    if not top > ZERO_DIAGONAL:  # also catches NaN
        return None
    scale = [1.0 / math.sqrt(top if d <= RELATIVE_ZERO_DIAGONAL * top else d) for d in diag]
    matrix = [
        [0.5 * (gramian[i][j] + gramian[j][i]) * scale[i] * scale[j] for j in range(m)]
        for i in range(m)
    ]
    for i in range(m):
        matrix[i][i] += eps
    # not safely positive definite with this ridge: the general path raises it
    if m == 2 and not matrix[0][0] * matrix[1][1] - matrix[0][1] ** 2 > 0.0:
        return None
    if m > 2 and cholesky(matrix) is None:
        return None
    problems = SmallLCP(matrix) if m > 2 else None
    solutions = []
    for bound in bounds:
        u = [bound[i] / scale[i] for i in range(m)]
        linear = [0.0] * m  # M u, over the nonzero entries of u (M is symmetric)
        for j, weight in enumerate(u):
            if weight != 0.0:
                linear = [a + weight * b for a, b in zip(linear, matrix[j], strict=True)]
        z = _tiny_nonnegative_lcp(matrix, linear) if problems is None else problems.solve(linear)
        if z is None:
            return None
        solutions.append([(u[i] + z[i]) * scale[i] for i in range(m)])
    return solutions


def solve_dual_cone(
    gramian: Tensor, lower_bounds: Tensor, reg_eps: float = DEFAULT_REGULARIZATION
) -> tuple[Tensor, DualConeInfo]:
    r"""Solve ``vᵢ = argmin_{v ≥ uᵢ} vᵀ G v`` for every row ``uᵢ`` of ``lower_bounds``.

    Exact up to the ridge (see the module docstring for the method). Computed on the CPU in
    float64; the result is returned on ``gramian``'s device and dtype.

    Args:
        gramian: ``G``, shape ``[m, m]``, symmetric positive semi-definite.
        lower_bounds: ``U``, shape ``[k, m]``.
        reg_eps: smallest relative ridge added to the equilibrated Gramian.

    Returns:
        ``(V, info)`` with ``V`` of shape ``[k, m]``, and what the solve needed beyond the fast
        path (a large ridge, clipped eigenvalues, quadprog fallbacks).
    """
    eps = initial_ridge(gramian, reg_eps)
    if gramian.shape[0] <= PLAIN_PYTHON_UP_TO:
        tiny = _solve_tiny(gramian.tolist(), lower_bounds.tolist(), eps)
        if tiny is not None:
            solution = torch.tensor(tiny, dtype=gramian.dtype, device=gramian.device)
            return solution, DualConeInfo(ridge=eps)
    with serial_numpy_blas(gramian.shape[0]):
        matrix, scale, info = equilibrated_problem(gramian, eps)
        bounds = lower_bounds.detach().to(device="cpu", dtype=torch.float64).numpy()
        u = bounds / scale[None, :]
        # Each problem is positively homogeneous in u: solve for u / max|u| and scale back.
        norms = np.abs(u).max(axis=1, initial=0.0)
        norms[norms == 0.0] = 1.0
        u = u / norms[:, None]
        z = _certified_lcp(matrix, u @ matrix, info)
        v = (u + z) * norms[:, None] * scale[None, :]
    result = torch.from_numpy(v).to(device=gramian.device, dtype=gramian.dtype)
    return result, info


def _certified_lcp(matrix: np.ndarray, linear: np.ndarray, info: DualConeInfo) -> np.ndarray:
    """Steps 3–4: the pivoting solve, with quadprog for every uncertified problem."""
    z, certified = solve_nonnegative_lcp(matrix, linear)
    for row in np.flatnonzero(~certified):
        info.n_fallbacks += 1
        z[row] = solve_quadprog_lcp(matrix, linear[row])
    return z


def solve_upgrad_weights(
    gramian: Tensor, preference: Tensor | None, reg_eps: float = DEFAULT_REGULARIZATION
) -> tuple[Tensor, DualConeInfo]:
    r"""``w = Σᵢ vᵢ`` with ``vᵢ = argmin_{v ≥ pᵢeᵢ} vᵀ G v``: UPGrad's weights.

    The same solve as :func:`solve_dual_cone` with the bounds ``diag(p)``, with less setup: by
    positive homogeneity, problem ``i`` is solved for the bound ``eᵢ`` in equilibrated variables
    (so its linear term is row ``i`` of ``M``) and scaled by ``pᵢ / Dᵢᵢ``, and the sum over
    ``i`` is one vector-matrix product. With ``m ≤`` :data:`~.small_lcp.PLAIN_PYTHON_UP_TO`, the
    plain-Python solve (:func:`_solve_tiny`) and its sum need no arrays at all; the rare small
    problems it declines take the general path. Preferences with a negative entry take
    :func:`solve_dual_cone`; ``preference=None`` is the uniform ``1/m``. From
    :data:`TORCH_FROM` losses on, and for a Gramian off the CPU, the problems are solved in
    float64 torch on the Gramian's device (:func:`_upgrad_weights_torch`).
    """
    eps = initial_ridge(gramian, reg_eps)
    m = gramian.shape[0]
    if m <= PLAIN_PYTHON_UP_TO:  # the plain-Python path, summed there too
        entries = [1.0 / m] * m if preference is None else preference.tolist()
        bounds = [[v if i == j else 0.0 for j in range(m)] for i, v in enumerate(entries)]
        tiny = _solve_tiny(gramian.tolist(), bounds, eps)
        if tiny is not None:
            summed = [sum(column) for column in zip(*tiny, strict=True)]
            result = torch.tensor(summed, dtype=gramian.dtype, device=gramian.device)
            return result, DualConeInfo(ridge=eps)
    if preference is not None and bool((preference < 0.0).any()):
        solutions, info = solve_dual_cone(gramian, torch.diag(preference), reg_eps)
        return solutions.sum(dim=0), info
    if m >= TORCH_FROM or gramian.device.type != "cpu":
        uniform = torch.full((m,), 1.0 / m, dtype=torch.float64, device=gramian.device)
        weights, info = _upgrad_weights_torch(
            gramian, uniform if preference is None else preference, eps
        )
        return weights.to(dtype=gramian.dtype), info
    if preference is None:
        p = np.full(m, 1.0 / m)
    else:
        p = preference.detach().to(device="cpu", dtype=torch.float64).numpy()
    with serial_numpy_blas(m):
        matrix, scale, info = equilibrated_problem(gramian, eps)
        z = _certified_lcp(matrix, matrix, info)
        norms = p / scale
        weights = scale * (norms + norms @ z)
    return torch.from_numpy(weights).to(device=gramian.device, dtype=gramian.dtype), info


def _upgrad_weights_torch(
    gramian: Tensor, preference: Tensor, eps: float
) -> tuple[Tensor, DualConeInfo]:
    """:func:`solve_upgrad_weights` in float64 torch on ``gramian``'s device: the same
    equilibration and ridge (:func:`equilibrated_problem_torch`), the ``m`` problems by
    :func:`.batched_lcp.solve_lcp_batched`, quadprog for any it does not certify."""
    matrix, scale, info = equilibrated_problem_torch(gramian, eps)
    z, certified = solve_lcp_batched(matrix, matrix)
    if not bool(certified.all()):
        host = matrix.cpu().numpy()
        for row in (~certified).nonzero().squeeze(1).tolist():
            info.n_fallbacks += 1
            z[row] = torch.from_numpy(solve_quadprog_lcp(host, host[row])).to(z.device)
    norms = preference.to(device=matrix.device, dtype=torch.float64) / scale
    return scale * (norms + norms @ z), info
