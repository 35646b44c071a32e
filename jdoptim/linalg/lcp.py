r"""Batched linear complementarity problems with a symmetric positive definite matrix.

For ``M ∈ R^{m×m}`` symmetric positive definite and ``k`` vectors ``qₖ``, find for each ``k``

.. math::  zₖ ≥ 0, \quad yₖ = M zₖ + qₖ ≥ 0, \quad zₖᵀ yₖ = 0,

which is the optimality system of ``zₖ = argmin_{z ≥ 0} ½ zᵀ M z + qₖᵀ z``.

**Block principal pivoting** (Júdice & Pires 1994). A guess of the *free set* ``F`` (the
variables with ``z > 0``) fixes the solution: ``z_F = -M_FF⁻¹ q_F``, ``z = 0`` elsewhere. Every
iteration solves that system for all unfinished problems at once, then flips every variable that
violates ``z ≥ 0`` (free) or ``y ≥ 0`` (bound). Flipping everything can cycle; the anti-cycling
rule of Kim & Park (2011) keeps the full flip while the number of violations decreases (or for
three more tries) and otherwise flips only the violating variable of largest index (Murty's
rule), which terminates for every P-matrix. The first pivots (``_UNGUARDED_PIVOTS``) flip
everything without that bookkeeping, which nearly always finishes the problem with fewer array
operations; the rule then starts afresh, so termination still holds.

**Principal pivot transform** for problems that share their first free set. From ``z = 0`` the
first pivot frees ``F₀ = {i : qᵢ < 0}``; in UPGrad on per-sample losses, most problems of a group
of agreeing losses share it, and each of their later free sets differs from ``F₀`` by a few
variables only. Exchanging the roles of ``z_{F₀}`` and ``y_{F₀}`` (``B`` the complement of
``F₀``, ``H = M_{F₀F₀}⁻¹``) gives the equivalent problem ``w = P x + q̂`` in the variables
``x = (y_{F₀}, z_B)``, ``w = (z_{F₀}, y_B)``:

.. math::

    P = \begin{pmatrix} H & -H M_{F₀B} \\ M_{BF₀} H & M_{BB} - M_{BF₀} H M_{F₀B} \end{pmatrix},
    \qquad q̂ = \begin{pmatrix} -H q_{F₀} \\ q_B - M_{BF₀} H q_{F₀} \end{pmatrix}.

``P`` is a P-matrix (the principal pivot transform of a positive definite matrix), so the same
block pivoting solves it, now from the free set ``∅`` of the transformed problem, which *is* the
state after the first pivot; its free sets ``S`` are the (small) symmetric differences
``F Δ F₀``, so every later pivot solves ``|S| × |S|`` systems instead of ``|F| × |F|`` ones. A
solution maps back by ``z_{F₀} = w_{F₀}``, ``z_B = x_B``.

**Certificate.** Every solution is checked against the KKT conditions of the original problem to
a relative tolerance. A problem solved through the transform that fails it (``M_{F₀F₀}`` badly
conditioned) is solved again directly; one that still fails is reported to the caller.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

import numpy as np

_PIVOT_TOL = 1e-13
_CERTIFICATE_TOL = 1e-9
#: Block pivots made before the anti-cycling bookkeeping starts.
_UNGUARDED_PIVOTS = 5
#: Up to this size, the free-set systems are solved at full size with the bound variables
#: masked out (fewer array operations), and the principal pivot transform is not used; above it,
#: the free variables are gathered (fewer flops).
_MASKED_SYSTEMS_UP_TO = 24

#: Gathered systems larger than this are split by free-set size (:func:`_solve_gathered`).
_BUCKETED_ABOVE = 8

#: ``solve(rows, free)``: the free-set solutions ``x`` of the problems ``rows`` (``None``: all).
_FreeSetSolver = Callable[[np.ndarray | None, np.ndarray], np.ndarray]


def solve_nonnegative_lcp(
    matrix: np.ndarray, linear: np.ndarray, max_iter: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    r"""Solve ``zₖ = argmin_{z ≥ 0} ½ zᵀ M z + qₖᵀ z`` for every row ``qₖ`` of ``linear``.

    Args:
        matrix: ``M``, shape ``[m, m]``, symmetric positive definite (float64).
        linear: ``Q``, shape ``[k, m]``, one ``qₖ`` per row (float64).
        max_iter: block pivots before giving up (default ``5m + 20``).

    Returns:
        ``(Z, certified)``: the solutions, shape ``[k, m]``, and a boolean mask of the problems
        whose KKT conditions (``z ≥ 0``, ``y = Mz + q ≥ 0``, ``y = 0`` where ``z > 0``) hold to a
        relative tolerance of ``1e-9``. Uncertified rows must be re-solved by the caller.

    Written for few array operations per iteration: a training step runs it right after large
    matrix products, when every small operation is slow.
    """
    k, m = linear.shape
    if max_iter is None:
        max_iter = 5 * m + 20
    scale = np.abs(linear).max(axis=1, initial=1e-300)  # [k]
    pivot_tol = (_PIVOT_TOL * scale)[:, None]
    z = None
    if m > _MASKED_SYSTEMS_UP_TO and k > 1:
        z = _solve_by_pivot_transform(matrix, linear, pivot_tol, max_iter)
    if z is None:
        z = _solve_directly(matrix, linear, pivot_tol, max_iter)
        return z, _certify(matrix, linear, z, scale)
    certified = _certify(matrix, linear, z, scale)
    if not certified.all():
        rows = np.flatnonzero(~certified)
        # clipped here: _certify clips its argument, which is a copy of these rows
        z[rows] = np.maximum(_solve_directly(matrix, linear[rows], pivot_tol[rows], max_iter), 0.0)
        certified[rows] = _certify(matrix, linear[rows], z[rows], scale[rows])
    return z, certified


def _certify(
    matrix: np.ndarray, linear: np.ndarray, z: np.ndarray, scale: np.ndarray
) -> np.ndarray:
    """Clip ``z`` to ``≥ 0`` in place and return which rows satisfy the KKT conditions."""
    np.maximum(z, 0.0, out=z)
    y = z @ matrix + linear
    tol = _CERTIFICATE_TOL * (scale + np.abs(matrix).max() * z.max(axis=1, initial=0.0))
    # y ≥ -tol everywhere and |y| ≤ tol where z > 0, as one test per entry (fewer operations)
    return (np.where(z > 0.0, np.abs(y), -y) <= tol[:, None]).all(axis=1)


def _block_pivoting(
    start: np.ndarray,
    solve: _FreeSetSolver,
    complement: Callable[[np.ndarray], np.ndarray],
    pivot_tol: np.ndarray,
    max_iter: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Block principal pivoting from the all-bound state ``x = 0``, ``w = start``.

    ``solve`` gives the free-set solutions, ``complement(x)`` the complementary variables
    ``w = P x + q̂`` of all problems. Returns ``(x, w, free)`` at the last iterate.
    """
    k, m = start.shape
    x = np.zeros((k, m))
    w = start
    floor = -pivot_tol
    infeasible = start < floor
    free = np.zeros((k, m), dtype=bool)
    for iteration in range(max_iter):
        counts = infeasible.sum(axis=1)
        todo = np.flatnonzero(counts)
        if todo.size == 0:
            break
        if iteration == _UNGUARDED_PIVOTS:
            best, backup = np.full(k, m + 1), np.full(k, 3)
        if iteration >= _UNGUARDED_PIVOTS:
            # Kim & Park's rule (see the module docstring).
            improving = counts < best
            best = np.minimum(best, counts)
            patient = backup > 0
            backup = np.where(improving, 3, backup - patient)
            single = (~improving & ~patient)[todo]
            if single.any():
                rows = todo[single]
                last = np.where(infeasible[rows], np.arange(m), -1).max(axis=1)
                infeasible[rows] = False
                infeasible[rows, last] = True
        if todo.size == k:
            free ^= infeasible
            x = solve(None, free)
        else:
            free[todo] ^= infeasible[todo]
            x[todo] = solve(todo, free[todo])
        w = complement(x)
        infeasible = np.where(free, x, w) < floor
    return x, w, free


def _solve_directly(
    matrix: np.ndarray, linear: np.ndarray, pivot_tol: np.ndarray, max_iter: int
) -> np.ndarray:
    """Block pivoting on ``(M, Q)`` itself: for each row ``k``, ``z_F = -M_FF⁻¹ q_F`` on its
    free set ``F`` at every pivot, by :func:`_solve_masked` up to :data:`_MASKED_SYSTEMS_UP_TO`
    variables (``-Q`` negated once), else by :func:`_solve_free_systems`."""
    if matrix.shape[0] <= _MASKED_SYSTEMS_UP_TO:
        negated = -linear

        def solve(rows: np.ndarray | None, free: np.ndarray) -> np.ndarray:
            return _solve_masked(matrix, negated if rows is None else negated[rows], free)

    else:

        def solve(rows: np.ndarray | None, free: np.ndarray) -> np.ndarray:
            return _solve_free_systems(matrix, linear if rows is None else linear[rows], free)

    z, _, _ = _block_pivoting(linear, solve, lambda z: z @ matrix + linear, pivot_tol, max_iter)
    return z


def _solve_free_systems(matrix: np.ndarray, linear: np.ndarray, free: np.ndarray) -> np.ndarray:
    """For each row ``k``: ``z_F = -M_FF⁻¹ q_F`` on its free set ``F``, ``z = 0`` elsewhere,
    for more than :data:`_MASKED_SYSTEMS_UP_TO` variables: the free variables gathered
    (:func:`_solve_gathered`), each distinct free set factored once when at least half the
    problems share theirs.
    """
    k = linear.shape[0]
    first, which = _distinct_rows(free)
    distinct = (first, which) if 2 * len(first) <= k else None
    return _solve_gathered(matrix[None], np.zeros(k, dtype=np.intp), linear, free, distinct)


def _solve_masked(matrix: np.ndarray, negated: np.ndarray, free: np.ndarray) -> np.ndarray:
    """``[M_FF 0; 0 I] z = [-q_F; 0]`` for each row's free set ``F``, at full size
    (``negated`` is ``-Q``)."""
    rhs = np.where(free, negated, 0.0)
    return np.linalg.solve(_identity_outside(matrix, free), rhs[:, :, None])[:, :, 0]


def _solve_gathered(
    matrices: np.ndarray,
    which: np.ndarray,
    linear: np.ndarray,
    free: np.ndarray,
    distinct: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """For each row ``k``: ``x_F = -A_FF⁻¹ q_F`` with ``A = matrices[which[k]]`` on its free set
    ``F``, ``x = 0`` elsewhere, the free variables gathered to the front so that every system has
    the size of the largest free set (padded with the identity), not ``m``.

    ``distinct = (first, rows)`` (from :func:`_distinct_rows` of ``free``, for problems of one
    matrix) factors each distinct free set once and applies its inverse to all its problems.

    Without it, problems whose free sets have at most half the largest one's size are solved
    apart, at their own padded size (recursively): a batched LU costs about ``size³`` per
    system, so padding a free set of 12 to 25 would cost several times its own solve.
    """
    k, m = linear.shape
    sizes = free.sum(axis=1)
    size = int(sizes.max())
    x = np.zeros((k, m))
    if size == 0:
        return x
    if distinct is None and size > _BUCKETED_ABOVE:
        small = sizes <= size // 2
        if small.any():
            for rows in (np.flatnonzero(small), np.flatnonzero(~small)):
                x[rows] = _solve_gathered(matrices, which[rows], linear[rows], free[rows])
            return x
    if distinct is None:
        order, valid = _free_first(free, size)
        systems = _gathered_systems(matrices, which, order, valid)
    else:
        first, rows = distinct
        order, valid = _free_first(free[first], size)
        inverses = np.linalg.inv(_gathered_systems(matrices, which[first], order, valid))
        order, valid = order[rows], valid[rows]
    rhs = np.where(valid, -np.take_along_axis(linear, order, axis=1), 0.0)[:, :, None]
    if distinct is None:
        solution = np.linalg.solve(systems, rhs)[:, :, 0]
    else:
        solution = (inverses[rows] @ rhs)[:, :, 0]
    np.put_along_axis(x, order, np.where(valid, solution, 0.0), axis=1)
    return x


def _distinct_rows(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, which)``: the index of each distinct row of a boolean mask's first occurrence,
    and for every row the number of its distinct row (keys are the rows' packed bits)."""
    packed = np.packbits(mask, axis=1)
    keys = packed.view(np.dtype((np.void, packed.shape[1])))[:, 0]
    _, first, which = np.unique(keys, return_index=True, return_inverse=True)
    return first, which.reshape(-1)


def _free_first(free: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``(order, valid)``: per row, the first ``size`` indices with the free ones first, and which
    of them are free."""
    order = np.argsort(~free, axis=1, kind="stable")[:, :size]
    return order, np.take_along_axis(free, order, axis=1)


def _gathered_systems(
    matrices: np.ndarray, which: np.ndarray, order: np.ndarray, valid: np.ndarray
) -> np.ndarray:
    """``matrices[which[k]]`` restricted to ``order[k]``, with the padding rows and columns
    replaced by those of the identity."""
    m = matrices.shape[-1]
    # One gather on flat indices: several times faster than indexing with three broadcast arrays.
    rows = (which[:, None] * m + order) * m  # [k, size]: where row order[k, i] of matrix k starts
    return _identity_outside(matrices.reshape(-1)[rows[:, :, None] + order[:, None, :]], valid)


def _identity_outside(systems: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """``[A_KK 0; 0 I]`` for each row's kept variables ``K`` (``kept``: ``[k, n]``), from
    ``systems`` (``[n, n]``, or ``[k, n, n]`` one matrix per row), at full size ``n``."""
    n = kept.shape[1]
    return np.where(kept[:, :, None] & kept[:, None, :], systems, _identity(n))


@functools.cache
def _identity(n: int) -> np.ndarray:
    """``I_n``, made once per size (read-only: it is shared)."""
    identity = np.eye(n)
    identity.flags.writeable = False
    return identity


def _solve_by_pivot_transform(
    matrix: np.ndarray, linear: np.ndarray, pivot_tol: np.ndarray, max_iter: int
) -> np.ndarray | None:
    """Solve through the principal pivot transform on each shared first free set (module
    docstring), or return ``None`` when fewer than half the problems share theirs."""
    k, m = linear.shape
    first, group = _distinct_rows(linear < -pivot_tol)
    if 2 * len(first) > k:
        return None
    # Sort the problems by group, so that each group's products are on one slice.
    perm = np.argsort(group, kind="stable")
    group = group[perm]
    linear = linear[perm]
    bounds = np.searchsorted(group, np.arange(len(first) + 1))
    slices = [slice(begin, end) for begin, end in itertools.pairwise(bounds.tolist())]
    sets = (linear < -pivot_tol[perm])[bounds[:-1]]
    transforms = np.empty((len(first), m, m))
    start = np.empty((k, m))
    for g, rows in enumerate(slices):
        transforms[g], start[rows] = _pivot_transform(matrix, linear[rows], sets[g])
    transposed = transforms.transpose(0, 2, 1)

    def solve(rows: np.ndarray | None, free: np.ndarray) -> np.ndarray:
        if rows is None:
            return _solve_gathered(transforms, group, start, free)
        return _solve_gathered(transforms, group[rows], start[rows], free)

    def complement(x: np.ndarray) -> np.ndarray:
        w = np.empty_like(x)
        for g, rows in enumerate(slices):
            np.matmul(x[rows], transposed[g], out=w[rows])
        return w + start

    x, w, free = _block_pivoting(start, solve, complement, pivot_tol[perm], max_iter)
    base = sets[group]
    z = np.zeros((k, m))
    z[perm] = np.where(base ^ free, np.where(base, w, x), 0.0)
    return z


def _pivot_transform(
    matrix: np.ndarray, linear: np.ndarray, base: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q̂)``: the principal pivot transform of ``M`` on the free set ``base`` and the
    transformed linear terms of the rows of ``linear`` (formulas in the module docstring)."""
    free = np.flatnonzero(base)
    inverse = np.linalg.inv(matrix[np.ix_(free, free)])  # H
    solved = inverse @ matrix[free]  # H M_F:
    transform = matrix - matrix[:, free] @ solved  # the Schur complement on B × B
    transform[free] = -solved
    transform[:, free] = solved.T
    transform[np.ix_(free, free)] = inverse
    linear_free = linear[:, free]
    start = linear - linear_free @ solved  # q_B - M_BF H q_F on B
    start[:, free] = -linear_free @ inverse
    return transform, start
