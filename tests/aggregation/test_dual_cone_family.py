"""UPGrad and DualProj on the benchmark's Gramian family (:mod:`benchmarks.gramian_family`):
real per-sample Gramians of an MLP, a CNN and a transformer (at init and trained), random,
rank-deficient, ill-conditioned and duplicated-sample Gramians, float32, batch 128 … 512.

The references are independent of the library's solvers: quadprog's dual active-set method on the
primal QP ``min vᵀ M v, v ≥ u`` (not the LCP the library solves), one problem at a time, and the
KKT conditions recomputed here from the returned solutions. The problem solved is the library's
regularised one (equilibrated Gramian plus its ridge, read from the solver's report).
"""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch

from benchmarks.gramian_family import FAMILIES, REAL, gramian
from jdoptim.aggregation import DualProjWeighting, UPGradWeighting
from jdoptim.linalg.batched_lcp import solve_lcp_batched
from jdoptim.linalg.dual_cone import solve_dual_cone, solve_upgrad_weights
from jdoptim.linalg.equilibration import (
    DEFAULT_REGULARIZATION,
    equilibrated_problem_torch,
    initial_ridge,
)

#: Real-model Gramians take a few seconds each to generate on a fresh checkout (then cached).
_PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in REAL else f for f in FAMILIES]


def _regularised(g: torch.Tensor, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """``(M, d)``: ``M = D G D + ridge·I`` with ``D = diag(d) = diag(G)^{-1/2}``, in float64."""
    g64 = g.double().numpy()
    g64 = 0.5 * (g64 + g64.T)
    d = 1.0 / np.sqrt(np.diag(g64))
    return g64 * np.outer(d, d) + ridge * np.eye(len(d)), d


def _quadprog_projection(matrix: np.ndarray, bound: np.ndarray) -> np.ndarray:
    """``argmin_{v ≥ bound} vᵀ M v`` by quadprog (primal form)."""
    m = len(bound)
    return quadprog.solve_qp(matrix, np.zeros(m), np.eye(m), bound)[0]


def _direction_error(
    matrix: np.ndarray, d: np.ndarray, w: np.ndarray, expected: np.ndarray
) -> float:
    """``‖w − w*‖_M / Σᵢ|w*ᵢ/dᵢ|`` in equilibrated variables (``w' = w / d``, unit diagonal):
    the error of the update direction ``Jᵀw`` for the regularised problem (``M`` is positive
    definite; the float32 ``G`` of a rank-deficient family is not), against the scale at which
    float32 weights are rounded (``Σ|w'ᵢ|``, the size of the sum ``Σ w'ᵢ g'ᵢ`` term by term)."""
    e = (w - expected) / d
    return float(np.sqrt(e @ matrix @ e) / np.abs(expected / d).sum())


@pytest.mark.parametrize("family", _PARAMS)
def test_upgrad_weights_match_quadprog_at_m128(family):
    g = gramian(family, 128)
    weights, info = solve_upgrad_weights(g, None)
    assert weights.dtype == torch.float32
    assert not info.n_fallbacks
    matrix, d = _regularised(g, info.ridge)
    p = np.full(128, 1.0 / 128)
    expected = sum(d * _quadprog_projection(matrix, np.eye(128)[i] * p[i] / d) for i in range(128))
    assert _direction_error(matrix, d, weights.double().numpy(), expected) <= 1e-6
    torch.testing.assert_close(UPGradWeighting()(g), weights)


@pytest.mark.parametrize("family", _PARAMS)
def test_dualproj_weights_match_quadprog(family):
    for m in (128, 512):
        g = gramian(family, m)
        weights, info = solve_dual_cone(g, torch.full((1, m), 1.0 / m))
        matrix, d = _regularised(g, info.ridge)
        expected = d * _quadprog_projection(matrix, np.full(m, 1.0 / m) / d)
        assert _direction_error(matrix, d, weights[0].double().numpy(), expected) <= 1e-6
        torch.testing.assert_close(DualProjWeighting()(g), weights[0])


def _kkt_violation(matrix: np.ndarray, z: np.ndarray) -> float:
    """Largest relative violation of ``z ≥ 0``, ``y = Mz + M ≥ 0``, ``z ∘ y = 0`` (``Q = M``)."""
    y = z @ matrix + matrix
    scale = np.abs(matrix).max() * (1.0 + np.abs(z).max(axis=1, keepdims=True))
    return float((np.maximum.reduce([-z, -y, np.abs(z * y)]) / scale).max())


@pytest.mark.parametrize(
    ("family", "m"),
    [
        ("random", 192),
        pytest.param("rank_deficient", 256, marks=pytest.mark.slow),
        pytest.param("mlp-trained", 512, marks=pytest.mark.slow),
    ],
)
def test_batched_solver_on_upgrad_problems_at_large_m(family, m):
    """All ``m`` of UPGrad's problems (``Q = M``) solved by the batched torch solver: every one
    satisfies the KKT conditions recomputed here, and three agree with quadprog."""
    g = gramian(family, m)
    _, _, info = equilibrated_problem_torch(g, initial_ridge(g, DEFAULT_REGULARIZATION))
    matrix, _ = _regularised(g, info.ridge)
    z, certified = solve_lcp_batched(torch.from_numpy(matrix), torch.from_numpy(matrix))
    assert certified.all()
    z = z.numpy()
    assert _kkt_violation(matrix, z) <= 1e-9
    for i in (0, m // 2, m - 1):
        v = _quadprog_projection(matrix, np.eye(m)[i])
        e = (np.eye(m)[i] + z[i]) - v
        assert np.sqrt(e @ matrix @ e / (v @ matrix @ v)) <= 1e-7
