r"""Exact solver of ``A w = w^{-p}`` (``w > 0``), behind Nash-MTL (``p = 1``) and FairGrad
(``p = 1/α``).

For ``A`` symmetric positive definite and ``p > 0``, the equation is the stationarity condition of
the strictly convex function

.. math::  f(w) = ½ wᵀ A w − \sum_i h(w_i), \qquad h'(w) = w^{-p}
           \;(h = \log \text{ for } p = 1, \; h(w) = w^{1-p}/(1-p) \text{ otherwise}),

whose minimiser on ``w > 0`` exists and is unique (``−h`` is a barrier at 0 and ``A`` is positive
definite). It is found by Newton's method (Hessian ``A + diag(p w^{-p-1})``) with a step kept in
``w > 0`` and an Armijo backtracking line search, stopped when the backward error
``maxᵢ |(Aw)ᵢ − wᵢ⁻ᵖ| / ((|A|w)ᵢ + wᵢ⁻ᵖ)`` is below ``tol``. The problem is homogeneous:
for ``A = κ Â``, ``w = κ^{-1/(1+p)} ŵ``, so it is solved for ``Â = A / mean(diag A)`` and
scaled back exactly.
"""

from __future__ import annotations

import numpy as np

DEFAULT_TOL = 1e-11


def _objective(a: np.ndarray, w: np.ndarray, p: float, coef: np.ndarray) -> float:
    barrier = coef @ np.log(w) if p == 1.0 else coef @ w ** (1.0 - p) / (1.0 - p)
    return 0.5 * float(w @ a @ w) - float(barrier)


def residual(a: np.ndarray, w: np.ndarray, p: float, coef: np.ndarray | None = None) -> float:
    """Backward error ``maxᵢ |(Aw)ᵢ − cᵢwᵢ⁻ᵖ| / ((|A| w)ᵢ + cᵢwᵢ⁻ᵖ)`` (``w > 0``).

    Zero exactly at the solution; a value ``δ`` means that ``w`` solves the equation for some
    ``A`` perturbed entrywise by a relative ``δ``. Unlike ``|(Aw)ᵢwᵢᵖ − 1|`` it can reach rounding
    level even when ``A`` is nearly singular and ``w`` large.
    """
    power = w ** (-p) * (1.0 if coef is None else coef)
    return float((np.abs(a @ w - power) / (np.abs(a) @ w + power)).max(initial=0.0))


def solve_power_equation(
    a: np.ndarray,
    p: float,
    start: np.ndarray | None = None,
    max_iter: int = 100,
    tol: float = DEFAULT_TOL,
    coef: np.ndarray | None = None,
) -> tuple[np.ndarray, int, float]:
    """Solve ``A w = c ⊙ w^{-p}``, ``w > 0``, for a positive definite ``A`` (float64).

    Args:
        a: ``A``, shape ``[m, m]``.
        p: the exponent, ``> 0``.
        start: initial point (default ``diag(A)^{-1/(1+p)}``, exact for a diagonal ``A``); it
            is used only when it is finite and positive.
        max_iter: maximum number of Newton iterations.
        tol: target backward error (see :func:`residual`).
        coef: positive coefficients ``c`` (default all ones); they let a caller solve the
            equation for an equilibrated ``DAD`` (``c = D^{1-p}``, ``w = Dw'``).

    Returns:
        ``(w, iterations, residual)``.
    """
    m = a.shape[0]
    coef = np.ones(m) if coef is None else coef
    kappa = float(np.trace(a)) / m
    a_hat = a / kappa
    back = kappa ** (-1.0 / (1.0 + p))
    if start is not None and start.shape == (m,) and np.isfinite(start).all() and (start > 0).all():
        w = start / back
    else:
        w = (np.diag(a_hat) / coef) ** (-1.0 / (1.0 + p))
    res = residual(a_hat, w, p, coef)
    iterations = 0
    value = _objective(a_hat, w, p, coef)
    while res > tol and iterations < max_iter:
        iterations += 1
        gradient = a_hat @ w - coef * w ** (-p)
        hessian = a_hat + np.diag(p * coef * w ** (-p - 1.0))
        step = -np.linalg.solve(hessian, gradient)
        negative = step < 0
        t = 1.0
        if negative.any():
            t = min(1.0, 0.99 * float((-w[negative] / step[negative]).min()))
        slope = float(gradient @ step)  # −(Newton decrement)²
        # Close to the solution the objective's changes fall below rounding: take the step.
        while -slope > 1e-9 * max(abs(value), 1.0):
            if _objective(a_hat, w + t * step, p, coef) <= value + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        w = w + t * step
        value = _objective(a_hat, w, p, coef)
        res = residual(a_hat, w, p, coef)
    return w * back, iterations, res
