r"""MoCo: Multi-objective gradient Correction (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen,
2023, "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
ICLR).

MoCo tracks each task's gradient with a moving average ``Y`` (which removes the bias of
stochastic MGDA) and moves its weights ``λ`` by a (softmax-)projected gradient step on
``½‖Yᵀλ‖² + ½ρ‖λ‖²``. At the ``t``-th call, with normalised gradients
``ĝᵢ = ℓᵢ gᵢ / (‖gᵢ‖ + ε)`` (LibMTL's and the authors' scaling by the loss value):

.. math::  Y \leftarrow Y - βₜ (Y - ĝ), \qquad
           λ \leftarrow \mathrm{softmax}\bigl(λ - γₜ (Y Yᵀ + ρ I) λ\bigr), \qquad d = Yᵀ λ,

with ``βₜ = β / t^{σ_β}``, ``γₜ = γ / t^{σ_γ}``, ``Y₀ = 0``, ``λ₀ = 1/m``. Defaults ``β = 0.5``,
``σ_β = 0.5``, ``γ = 0.1``, ``σ_γ = 0.5``, ``ρ = 0`` (LibMTL's), ``ε = 10⁻⁸``. The softmax stands
for the paper's projection onto the simplex, as in the authors' code and LibMTL.

Needs the Jacobian and the loss values (an :class:`~jdoptim.aggregation.InputAggregator`; not
available with ``features=``). **State**: ``Y`` (``[m, n]``), ``λ`` and ``t``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._inputs import InputAggregator, MethodInputs
from ._mixins import Stateful, _NonDifferentiable
from .dbmtl import check_loss_values, check_matching_state
from .state import CheckpointedState


class MoCo(_NonDifferentiable, CheckpointedState, Stateful, InputAggregator):
    """MoCo aggregator (see the module docstring).

    Args:
        beta: step ``β ∈ (0, 1]`` of the gradient tracking (default ``0.5``).
        beta_sigma: decay ``σ_β ≥ 0`` of ``β`` (default ``0.5``).
        gamma: step ``γ > 0`` of the weights (default ``0.1``).
        gamma_sigma: decay ``σ_γ ≥ 0`` of ``γ`` (default ``0.5``).
        rho: ``ℓ₂`` regularisation ``ρ ≥ 0`` of the weights (default ``0``).
        eps: ``ε > 0`` in the gradient normalisation (default ``1e-8``).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"jacobian", "losses"})

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"`beta` must be in (0, 1], got {beta}.")
        if not gamma > 0.0:
            raise ValueError(f"`gamma` must be positive, got {gamma}.")
        if not (beta_sigma >= 0.0 and gamma_sigma >= 0.0 and rho >= 0.0 and eps > 0.0):
            raise ValueError("`beta_sigma`, `gamma_sigma` and `rho` must be >= 0, `eps` > 0.")
        super().__init__()
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma = float(gamma), float(gamma_sigma)
        self.rho, self.eps = float(rho), float(eps)
        self.tracked: Tensor | None
        self.weights: Tensor | None
        self.steps: int
        self.declare_state("tracked", None)
        self.declare_state("weights", None)
        self.declare_state("steps", 0, convert=int)

    def forward(self, inputs: MethodInputs) -> Tensor:
        matrix, losses = inputs.jacobian, inputs.losses
        assert matrix is not None and losses is not None
        m = matrix.shape[0]
        check_loss_values("MoCo", losses, m)
        check_matching_state("MoCo", self.tracked, matrix)
        normalized = matrix / (matrix.norm(dim=1, keepdim=True) + self.eps)
        normalized = normalized * losses.to(matrix).unsqueeze(1)
        steps = self.steps + 1
        tracked = torch.zeros_like(matrix) if self.tracked is None else self.tracked.to(matrix)
        tracked = tracked - self.beta / steps**self.beta_sigma * (tracked - normalized)
        weights = matrix.new_full((m,), 1.0 / m) if self.weights is None else self.weights
        weights = weights.to(matrix)
        eye = torch.eye(m, dtype=matrix.dtype, device=matrix.device)
        curvature = tracked @ tracked.T + self.rho * eye
        step = self.gamma / steps**self.gamma_sigma
        weights = torch.softmax(weights - step * (curvature @ weights), dim=0)
        self.tracked, self.weights, self.steps = tracked, weights, steps
        return tracked.T @ weights

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta:g}, beta_sigma={self.beta_sigma:g}, gamma={self.gamma:g}, "
            f"gamma_sigma={self.gamma_sigma:g}, rho={self.rho:g}"
        )
