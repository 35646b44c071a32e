r"""Nash-MTL: multi-task learning as a bargaining game (Navon, Shamsian, Achituve, Maron,
Kawaguchi, Chechik & Fetaya, 2022, "Multi-Task Learning as a Bargaining Game", ICML).

The Nash bargaining solution ``d = Jᵀα`` satisfies ``gᵢᵀd = 1/αᵢ`` for every task, i.e.

.. math::  \hat G α = 1/α \;(\text{elementwise}), \qquad α > 0,
           \qquad \hat G = G / ‖G‖_F .

Normalisation: as in the authors' code, the Gramian is divided by its Frobenius norm before
solving, which makes the weights invariant to the scale of the gradients and the update
``d = Jᵀα`` positively homogeneous (``‖d‖² = m‖G‖_F`` before clipping). Then, as the reference
clips the gradient norm of the shared parameters, the weights are scaled down so that
``‖Jᵀα‖ = √(αᵀGα) ≤ max_norm`` (``max_norm = 0`` disables it); this uses the current Gramian on
every call, also when the weights are cached.

Solver: the authors solve a sequence of convex-concave cvxpy problems (``optim_niter`` of them).
Here the equation is solved exactly: it is the stationarity condition of the strictly convex
``½αᵀĜα − Σ log αᵢ``, minimised by a damped Newton method warm-started from the cached weights
(see :mod:`jdoptim.linalg.power_equation`). ``optim_niter`` bounds the Newton iterations of a
normal update (4–6 are typical). If they do not reach a backward error of ``1e-11``, a one-time
warning says so and Newton continues up to ``50·optim_niter`` iterations; if even that fails, a
warning with the residual is emitted on that call: inexact weights are never returned silently.
No cvxpy, so no per-call problem compilation. A rank-deficient ``Ĝ`` has no solution; a ridge
``εI`` (``ε = reg_eps``, raised automatically with a one-time warning when needed) makes it
solvable, with very large weights along null directions (which do not change ``d`` before
clipping). A zero Gramian gives zero weights.

State (:class:`~jdoptim.aggregation.Stateful`): the step counter and the cached weights. Weights
are recomputed on the first call and every ``update_weights_every`` calls, otherwise the cached
ones are reused (the authors' speed-up). Both are declared state
(:mod:`jdoptim.aggregation.state`): ``state_dict()`` holds them, ``reset()`` forgets them (and
the warn-once flags). Defaults follow the authors' code: ``max_norm=1.0``,
``update_weights_every=1``, ``optim_niter=20``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ..linalg.user_frame import user_stacklevel
from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import Stateful, _NonDifferentiable
from ._scaling import normalized_jacobian, scale_free, times_power_of_two
from .arguments import check_reg_eps as _check_reg_eps
from .fairgrad import solve_fair_weights
from .state import CheckpointedState, DeclaredState


def _to_float64(weights: Tensor) -> Tensor:
    return weights.to(torch.float64)


class NashMTLWeighting(_NonDifferentiable, CheckpointedState, Stateful, Weighting):
    """Weights of :class:`NashMTL`: ``α > 0`` with ``(G/‖G‖_F) α = 1/α``, then norm-clipped.

    Args:
        max_norm: upper bound on ``‖Jᵀα‖`` (default ``1.0``; ``0`` disables clipping).
        update_weights_every: recompute the weights every this many calls (default ``1``).
        optim_niter: Newton iterations of a normal update (default ``20``).
        reg_eps: smallest ridge added to the normalised Gramian (default ``1e-10``).
    """

    def __init__(
        self,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        reg_eps: float = 1e-10,
    ) -> None:
        super().__init__()
        if not (isinstance(max_norm, (int, float)) and math.isfinite(max_norm) and max_norm >= 0):
            raise ValueError(f"max_norm must be a finite number ≥ 0, got {max_norm!r}.")
        for name, value in (
            ("update_weights_every", update_weights_every),
            ("optim_niter", optim_niter),
        ):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        _check_reg_eps(reg_eps)
        self.max_norm = float(max_norm)
        self.update_weights_every = update_weights_every
        self.optim_niter = optim_niter
        self.reg_eps = reg_eps
        # α does not depend on the scale; the clipping does.
        self.scale_degree = 0.0 if self.max_norm == 0.0 else None
        self._step: int
        self._weights: Tensor | None
        self._warned_slow: bool
        self.declare_state("_step", 0, convert=int)
        self.declare_state("_weights", None, convert=_to_float64)
        self.declare_warning("_warned_slow")  # Newton needed more than optim_niter iterations
        self.declare_warning("_warned_ill_conditioned")  # set by warn_once_if_degraded

    def _solve(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        frobenius = float(gramian.double().norm())
        if not frobenius > 0.0:
            return torch.zeros(m, dtype=torch.float64)
        normalized = gramian.double() / frobenius
        start = self._weights if self._weights is not None and len(self._weights) == m else None
        weights, res, ok = solve_fair_weights(
            normalized, 1.0, self.reg_eps, start, self.optim_niter, self
        )
        if not ok:
            if not self._warned_slow:
                self._warned_slow = True
                warnings.warn(
                    f"NashMTL: {self.optim_niter} Newton iterations left a backward error of "
                    f"{res:.2e}; continuing up to {50 * self.optim_niter} iterations "
                    "(warned once).",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
            weights, res, ok = solve_fair_weights(
                normalized, 1.0, self.reg_eps, weights, 50 * self.optim_niter, self
            )
            if not ok:
                warnings.warn(
                    f"NashMTL: the bargaining equation was not solved (backward error {res:.2e});"
                    " these weights are inexact.",
                    RuntimeWarning,
                    stacklevel=user_stacklevel(),
                )
        return weights

    def unclipped_weights(self, gramian: Tensor) -> Tensor:
        """The bargaining weights ``α`` of ``gramian`` (cached or solved; one step of the
        state), before clipping: on the CPU, in float64. They do not depend on the Gramian's
        scale, which :class:`NashMTL` uses to pass the Gramian of a normalised Jacobian."""
        m = gramian.shape[0]
        weights = self._weights
        if weights is None or len(weights) != m or self._step % self.update_weights_every == 0:
            weights = self._weights = self._solve(gramian)
        self._step += 1
        return weights.clone()

    def clip(self, weights: Tensor, norm: float) -> Tensor:
        """``α`` scaled down so that ``‖Jᵀα‖ ≤ max_norm``, given ``norm = ‖Jᵀα‖``."""
        if self.max_norm > 0.0 and norm > self.max_norm:
            return weights * (self.max_norm / norm)
        return weights

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        weights = self.unclipped_weights(gramian)
        g = gramian.detach().to(device="cpu", dtype=torch.float64)
        norm = max(float(weights @ g @ weights), 0.0) ** 0.5
        return self.clip(weights, norm).to(device=gramian.device, dtype=gramian.dtype)

    def extra_repr(self) -> str:
        return (
            f"max_norm={self.max_norm:g}, update_weights_every={self.update_weights_every}, "
            f"optim_niter={self.optim_niter}, reg_eps={self.reg_eps:g}"
        )


class NashMTL(_NonDifferentiable, DeclaredState, Stateful, GramianWeightedAggregator):
    """Aggregator of :class:`NashMTLWeighting` (stateful: see its ``reset``).

    Args:
        max_norm: see :class:`NashMTLWeighting`.
        update_weights_every: see :class:`NashMTLWeighting`.
        optim_niter: see :class:`NashMTLWeighting`.
        reg_eps: see :class:`NashMTLWeighting`.
    """

    weighting: NashMTLWeighting

    def __init__(
        self,
        max_norm: float = 1.0,
        update_weights_every: int = 1,
        optim_niter: int = 20,
        reg_eps: float = 1e-10,
    ) -> None:
        super().__init__(NashMTLWeighting(max_norm, update_weights_every, optim_niter, reg_eps))

    def forward(self, matrix: Tensor) -> Tensor:
        # α from the Gramian of J' = J / 2^e (it cannot under- or overflow; α does not depend
        # on the scale), then clipped with ‖Jᵀα‖ = 2^e ‖J'ᵀα‖.
        normalized, exponent = normalized_jacobian(matrix)
        gramian = normalized @ normalized.T
        weights = self.weighting.unclipped_weights(gramian)
        g = gramian.detach().to(device="cpu", dtype=torch.float64)
        norm = max(float(weights @ g @ weights), 0.0) ** 0.5
        norm = float(times_power_of_two(torch.tensor(norm, dtype=torch.float64), exponent))
        weights = self.weighting.clip(weights, norm)
        return weights.to(device=matrix.device, dtype=matrix.dtype) @ matrix
