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

**State** (checkpointed with ``state_dict()`` through ``get_extra_state``, forgotten by
:meth:`ExcessMTL.reset`): the running sums ``S`` (``[m, n]``, as large as the Jacobian), the first
excess risks ``e^{(1)}`` (``[m]``) and the weights ``λ`` (``[m]``). A loss whose first excess risk
is ``0`` (zero gradient) records its first non-zero one instead and is not re-weighted until then.

The diagonal Hessian estimate is coordinate-wise, so ExcessMTL needs the Jacobian (it is an
:class:`~jdoptim.aggregation.Aggregator`, not a Weighting). Non-differentiable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._bases import Aggregator
from ._mixins import Stateful, _NonDifferentiable


class ExcessMTL(_NonDifferentiable, Stateful, Aggregator):
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
        self._squared_sums: Tensor | None = None
        self._initial_risks: Tensor | None = None
        self._weights: Tensor | None = None

    @property
    def weights(self) -> Tensor | None:
        """The weights ``λ`` used at the last call (``None`` before the first)."""
        return self._weights

    def forward(self, matrix: Tensor) -> Tensor:
        if self._squared_sums is None:
            return self._first_call(matrix)
        if self._squared_sums.shape != matrix.shape:
            raise ValueError(
                f"ExcessMTL accumulated Jacobians of shape {tuple(self._squared_sums.shape)} and "
                f"now receives one of shape {tuple(matrix.shape)}. Call reset() to start over."
            )
        assert self._initial_risks is not None and self._weights is not None
        squared_sums = self._squared_sums.to(matrix) + matrix.square()
        risks = self._excess_risks(matrix, squared_sums)
        initial = self._initial_risks.to(matrix)
        known = initial > 0
        ratios = torch.where(known, risks / torch.where(known, initial, 1.0), 0.0)
        weights = self._weights.to(matrix) * torch.exp(self.robust_step_size * ratios)
        weights = weights * (matrix.shape[0] / weights.sum())
        self._squared_sums = squared_sums
        self._initial_risks = torch.where(known, initial, risks)
        self._weights = weights
        return weights @ matrix

    def _first_call(self, matrix: Tensor) -> Tensor:
        squared_sums = matrix.square()
        self._squared_sums = squared_sums
        self._initial_risks = self._excess_risks(matrix, squared_sums)
        self._weights = torch.ones(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        return self._weights @ matrix

    def _excess_risks(self, matrix: Tensor, squared_sums: Tensor) -> Tensor:
        return (matrix.square() / (squared_sums + self.eps).sqrt()).sum(dim=1)

    def reset(self) -> None:
        """Forget the accumulated squared gradients, the first excess risks and the weights."""
        self._squared_sums = None
        self._initial_risks = None
        self._weights = None

    def get_extra_state(self) -> dict[str, Any]:
        def copy(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.clone()

        return {
            "squared_sums": copy(self._squared_sums),
            "initial_risks": copy(self._initial_risks),
            "weights": copy(self._weights),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        def copy(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.clone()

        self._squared_sums = copy(state["squared_sums"])
        self._initial_risks = copy(state["initial_risks"])
        self._weights = copy(state["weights"])

    def extra_repr(self) -> str:
        return f"robust_step_size={self.robust_step_size:g}, eps={self.eps:g}"
