r"""ExcessMTL (He et al., 2024, "Robust Multi-Task Learning with Excess Risks", ICML,
arXiv:2402.02009).

ExcessMTL weights the losses by their estimated *excess risk* (distance to their own optimum)
rather than by their raw value, so that tasks with irreducible noise (label noise) do not take
over the training. With a second-order Taylor expansion and a diagonal Hessian approximated, as in
AdaGrad, by the square root of the accumulated squared gradients, the excess risk of loss ``i`` at
step ``t`` is estimated by

.. math::  e_i^{(t)} = \sum_k \frac{J_{ik}^2}{\sqrt{S_{ik}^{(t)} + ε}}, \qquad
           S^{(t)} = \sum_{τ \le t} J^{(τ)} \odot J^{(τ)} .

The weights follow an exponentiated-gradient (mirror ascent) step on the simplex, on excess risks
normalised by their first values ``e_i^{(1)}``:

.. math::  λ_i \leftarrow λ_i \exp\bigl(η\, e_i^{(t)} / e_i^{(1)}\bigr), \qquad
           λ \leftarrow m\, λ / \textstyle\sum_j λ_j ,

starting from ``λ = 1`` (the first call only records ``e^{(1)}`` and returns ``d = Σ_i g_i``); the
update is ``d = λᵀ J`` with the weights of the current step. ``η = robust_step_size`` (default
``1e-2``, as in LibMTL, which carries the authors' implementation) and ``ε = 1e-7``.

**Numerics.** The state keeps ``R = √S`` (accumulated by ``R ← hypot(R, |J|)``) rather than
``S``, and ``e_i = Σ_k |J_ik| (|J_ik| / hypot(R_ik, √ε))`` is evaluated in float64: no square of
a gradient entry is ever formed, so gradients of ``1e30`` (float32) neither overflow to ``inf``
nor, at ``1e-30``, underflow to a zero risk. The weight update is done on ``log λ`` (shifted by
its maximum before exponentiating), so that a large risk ratio cannot overflow ``exp``.

**State** (declared, :mod:`jdoptim.aggregation.state`: checkpointed with ``state_dict()``,
forgotten by ``reset()``): the root sums ``R = √S`` (``[m, n]``, as large as the Jacobian), the
first excess risks ``e^{(1)}`` (``[m]``) and the weights ``λ`` (``[m]``). A checkpoint written
with the squared sums ``S`` (key ``"squared_sums"``) loads as ``R = √S``. A loss whose first
excess risk is ``0`` (zero gradient) records its first non-zero one instead and is not
re-weighted until then.

The diagonal Hessian estimate is coordinate-wise, so ExcessMTL needs the Jacobian (it is an
:class:`~jdoptim.aggregation.Aggregator`, not a Weighting). Non-differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._bases import Aggregator
from ._mixins import Stateful, _NonDifferentiable
from .state import CheckpointedState


class ExcessMTL(_NonDifferentiable, CheckpointedState, Stateful, Aggregator):
    """ExcessMTL aggregator (see the module docstring).

    Args:
        robust_step_size: the step size ``η > 0`` of the weights' update (default ``1e-2``).
        eps: ``ε > 0`` added to the accumulated squared gradients (default ``1e-7``).
    """

    def __init__(self, robust_step_size: float = 1e-2, eps: float = 1e-7) -> None:
        if not robust_step_size > 0:
            raise ValueError(f"`robust_step_size` must be positive, got {robust_step_size}.")
        if not eps > 0:
            raise ValueError(f"`eps` must be positive, got {eps}.")
        super().__init__()
        self.robust_step_size = float(robust_step_size)
        self.eps = float(eps)
        self._root_sums: Tensor | None
        self._initial_risks: Tensor | None
        self._weights: Tensor | None
        self.declare_state("_root_sums", None)
        self.declare_state("_initial_risks", None)
        self.declare_state("_weights", None)

    @property
    def weights(self) -> Tensor | None:
        """The weights ``λ`` used at the last call (``None`` before the first)."""
        return self._weights

    def forward(self, matrix: Tensor) -> Tensor:
        if self._root_sums is None:
            return self._first_call(matrix)
        if self._root_sums.shape != matrix.shape:
            raise ValueError(
                f"ExcessMTL accumulated Jacobians of shape {tuple(self._root_sums.shape)} and "
                f"now receives one of shape {tuple(matrix.shape)}. Call reset() to start over."
            )
        assert self._initial_risks is not None and self._weights is not None
        root_sums = torch.hypot(self._root_sums.to(matrix), matrix.abs())
        risks = self._excess_risks(matrix, root_sums)
        initial = self._initial_risks.to(risks)
        known = initial > 0
        ratios = torch.where(known, risks / torch.where(known, initial, 1.0), 0.0)
        logits = self._weights.to(risks).log() + self.robust_step_size * ratios
        weights = (logits - logits.max()).exp()
        weights = weights * (matrix.shape[0] / weights.sum())
        self._root_sums = root_sums
        self._initial_risks = torch.where(known, initial, risks)
        self._weights = weights.to(matrix.dtype)
        return self._weights @ matrix

    def _first_call(self, matrix: Tensor) -> Tensor:
        root_sums = matrix.abs()
        self._root_sums = root_sums
        self._initial_risks = self._excess_risks(matrix, root_sums)
        self._weights = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return self._weights @ matrix

    def _excess_risks(self, matrix: Tensor, root_sums: Tensor) -> Tensor:
        """``e_i = Σ_k J_ik² / √(S_ik + ε)``, as ``Σ_k |J_ik| (|J_ik| / hypot(R_ik, √ε))`` in
        float64 (see the module docstring)."""
        magnitudes = matrix.abs().to(torch.float64)
        denominators = torch.hypot(
            root_sums.to(torch.float64), torch.tensor(self.eps**0.5, dtype=torch.float64)
        )
        return (magnitudes * (magnitudes / denominators)).sum(dim=1)

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Also loads a checkpoint of ``S`` itself (key ``"squared_sums"``, written before
        ``R = √S`` was kept) as ``R = √S``."""
        if isinstance(state, dict) and "squared_sums" in state:
            state = dict(state)
            squared = state.pop("squared_sums")
            state["root_sums"] = None if squared is None else squared.clamp(min=0.0).sqrt()
        super().set_extra_state(state)

    def extra_repr(self) -> str:
        return f"robust_step_size={self.robust_step_size:g}, eps={self.eps:g}"
