r"""Linear complementarity problems of a few variables, in plain Python arithmetic.

The problem of :mod:`.lcp`: for ``M ∈ R^{m×m}`` symmetric positive definite and a vector ``q``,
find

.. math::  z ≥ 0, \quad y = M z + q ≥ 0, \quad zᵀ y = 0,

the optimality system of ``z = argmin_{z ≥ 0} ½ zᵀ M z + qᵀ z``, for ``m`` up to
:data:`PLAIN_PYTHON_UP_TO`. The method is :mod:`.lcp`'s block principal pivoting (Júdice & Pires
1994) with Kim & Park's anti-cycling rule, started from ``z = 0``: a guess of the free set ``F``
gives ``z_F = -M_FF⁻¹ q_F`` (a Cholesky factorisation of ``M_FF``, kept per free set for every
problem of one ``M``), and each pivot flips the variables that violate ``z ≥ 0`` or ``y ≥ 0``.
The solution is accepted only when it passes :mod:`.lcp`'s KKT certificate (the same relative
tolerance); otherwise, and when the pivots do not end, the caller takes the array solver.

Why plain Python: a training step solves the problems right after its large products, when
every small array operation is slow (the products have evicted numpy's code and data from the
caches). Measured on this project's 2-core machine for UPGrad's ``m`` problems on random
Gramians, the median time after a ``512 × 512`` product, numpy solver against this one: 486 /
107 µs at ``m = 4``, 451 / 217 µs at 8, 599 / 721 µs at 12, 677 / 862 µs at 16. Its cost grows
as ``m³`` (every problem pivots alone) where numpy's barely grows (the ``m`` problems pivot
together), and with the free sets' sizes: on GPT-2 tiny's per-sample Gramians (eight samples,
each in conflict with about half of the others) it takes 300 µs in a warm loop against numpy's
170. Inside whole training steps (in-process A/B against the array solver, 80–100 rounds, GPT-2
tiny and Llama small): 3 task losses 0.975 of the step's time, 4 tasks 0.968–0.985, 6 tasks
0.987; at 8 losses neither is faster (0.988–1.004 over seven runs, task and per-sample losses),
hence :data:`PLAIN_PYTHON_UP_TO`.
"""

from __future__ import annotations

import itertools
import math

from .lcp import _CERTIFICATE_TOL, _PIVOT_TOL, _UNGUARDED_PIVOTS  # (the same rule and tolerances)

__all__ = ["PLAIN_PYTHON_UP_TO", "SmallLCP", "cholesky"]

#: The largest ``m`` solved here (see the module docstring for the timings that set it).
PLAIN_PYTHON_UP_TO = 6


Matrix = list[list[float]]


def cholesky(matrix: Matrix) -> Matrix | None:
    """The lower-triangular ``L`` with ``L Lᵀ = matrix`` (row ``i`` holds ``i + 1`` entries), or
    ``None`` when a pivot is not positive (the matrix is not safely positive definite, or holds
    a NaN)."""
    factor: Matrix = []
    for i, row in enumerate(matrix):
        current = row[: i + 1]  # (plain loops: few calls, this runs in every step)
        for j in range(i + 1):
            above = factor[j] if j < i else current
            total = current[j]
            for k in range(j):
                total -= current[k] * above[k]
            if j < i:
                current[j] = total / above[j]
            elif not total > 0.0:
                return None
            else:
                current[j] = math.sqrt(total)
        factor.append(current)
    return factor


def _solve_factored(factor: Matrix, rhs: list[float]) -> list[float]:
    """``x`` with ``L Lᵀ x = rhs``: forward then backward substitution."""
    n = len(rhs)
    forward = [0.0] * n
    for i in range(n):
        row = factor[i]
        total = rhs[i]
        for k in range(i):
            total -= row[k] * forward[k]
        forward[i] = total / row[i]
    x = [0.0] * n
    for i in range(n - 1, -1, -1):
        total = forward[i]
        for k in range(i + 1, n):
            total -= factor[k][i] * x[k]
        x[i] = total / factor[i][i]
    return x


class SmallLCP:
    """The problems of one matrix ``M`` (symmetric positive definite, ``m ≤``
    :data:`PLAIN_PYTHON_UP_TO`); :meth:`solve` takes one ``q`` at a time and keeps the free
    sets' factorisations for the next."""

    def __init__(self, matrix: Matrix) -> None:
        self.matrix = matrix
        self.m = len(matrix)
        self.max_iter = 5 * self.m + 20
        self.largest = max(map(abs, itertools.chain.from_iterable(matrix)))
        self._factors: dict[tuple[int, ...], Matrix | None] = {}

    def solve(self, linear: list[float]) -> list[float] | None:
        """The certified solution ``z`` for ``q = linear``, or ``None`` (no certified solution
        within the pivots: the caller's array solver takes over)."""
        scale = max(max(map(abs, linear)), 1e-300)
        z = self._pivot(linear, -_PIVOT_TOL * scale)
        if z is None:
            return None
        z = [v if v > 0.0 else 0.0 for v in z]
        y = self._complement(linear, z, [j for j, v in enumerate(z) if v > 0.0])
        tol = _CERTIFICATE_TOL * (scale + self.largest * max(z))
        for yj, zj in zip(y, z, strict=True):  # (a loop: this runs in every step)
            if yj < -tol or (zj != 0.0 and abs(yj) > tol):
                return None
        return z

    def _complement(self, linear: list[float], z: list[float], free: list[int]) -> list[float]:
        """``y = M z + q`` for a ``z`` that vanishes outside ``free`` (``M`` is symmetric)."""
        y = linear
        for a in free:  # (column a of M is its row a)
            weight = z[a]
            y = [value + weight * entry for value, entry in zip(y, self.matrix[a], strict=True)]
        return y

    def _pivot(self, linear: list[float], tol: float) -> list[float] | None:
        """Block principal pivoting from ``z = 0`` (see the module docstring); ``z`` at the
        last iterate, or ``None`` when the pivots do not end or a free set's system is not
        positive definite."""
        m = self.m
        free = [False] * m
        infeasible = [v < tol for v in linear]
        z = [0.0] * m
        best, backup = m + 1, 3
        for iteration in range(self.max_iter):
            count = sum(infeasible)
            if count == 0:
                return z
            if iteration >= _UNGUARDED_PIVOTS:  # Kim & Park's rule, as in .lcp
                if count < best:
                    best, backup = count, 3
                elif backup > 0:
                    backup -= 1
                else:  # flip only the violating variable of largest index (Murty)
                    last = max(j for j in range(m) if infeasible[j])
                    infeasible = [j == last for j in range(m)]
            free = [f != flip for f, flip in zip(free, infeasible, strict=True)]
            chosen = [j for j in range(m) if free[j]]
            solution = self._free_solution(linear, chosen)
            if solution is None:
                return None
            z = solution
            y = self._complement(linear, z, chosen)
            infeasible = [(z[j] if free[j] else y[j]) < tol for j in range(m)]
        return None

    def _free_solution(self, linear: list[float], chosen: list[int]) -> list[float] | None:
        """``z_F = -M_FF⁻¹ q_F`` on the free set ``F = chosen``, ``0`` elsewhere."""
        z = [0.0] * self.m
        if not chosen:
            return z
        key = tuple(chosen)
        if key not in self._factors:
            self._factors[key] = cholesky([[self.matrix[a][b] for b in chosen] for a in chosen])
        factor = self._factors[key]
        if factor is None:
            return None
        for a, value in zip(chosen, _solve_factored(factor, [-linear[a] for a in chosen])):
            z[a] = value
        return z
