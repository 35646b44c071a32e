r"""DB-MTL: Dual-Balancing Multi-Task Learning (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok,
2023, "Dual-Balancing for Multi-Task Learning", arXiv:2308.12029; Neural Networks).

Two balances. **Loss scale**: each loss is replaced by its logarithm, whose gradient is
``∇ log(ℓᵢ + ε) = gᵢ / (ℓᵢ + ε)``. **Gradient magnitude**: an exponential moving average of these
gradients, ``Y ← ĝ + βₜ (Y − ĝ)`` with ``βₜ = β / t^{σ}`` at the ``t``-th call (``Y₀ = 0``), is
rescaled so that every task's contribution has the norm of the largest:

.. math::  d = Σᵢ \frac{\max_j \lVert Y_j \rVert}{\lVert Y_i \rVert + ε}\, Y_i .

Defaults ``β = 0.9``, ``σ = 0`` (LibMTL's), ``ε = 10⁻⁸``. The average is over past Jacobians, so
DB-MTL is an :class:`~jdoptim.aggregation.InputAggregator` of the Jacobian and the loss values
(no Gramian form; not available with ``features=``); with :class:`jdoptim.JDOptimizer` it uses
the explicit-Jacobian path. **State**: ``Y`` (``[m, n]``, as large as the Jacobian) and ``t``.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._inputs import InputAggregator, MethodInputs
from ._mixins import Stateful, _NonDifferentiable
from .state import CheckpointedState


def check_matching_state(name: str, state: Tensor | None, matrix: Tensor) -> None:
    """Raise when a kept ``[m, n]`` average no longer matches the Jacobian's shape."""
    if state is not None and state.shape != matrix.shape:
        raise ValueError(
            f"{name} averaged Jacobians of shape {tuple(state.shape)} and now receives one of "
            f"shape {tuple(matrix.shape)}: call reset() to start over."
        )


def check_loss_values(name: str, losses: Tensor, m: int) -> None:
    if losses.shape != (m,):
        raise ValueError(f"{name} got {tuple(losses.shape)} loss values for {m} losses.")


class DBMTL(_NonDifferentiable, CheckpointedState, Stateful, InputAggregator):
    """DB-MTL aggregator (see the module docstring).

    Args:
        beta: EMA coefficient ``β ∈ [0, 1)`` (default ``0.9``).
        beta_sigma: decay ``σ ≥ 0`` of ``β`` over the calls (default ``0``).
        eps: ``ε > 0`` in the logarithm and the rescaling (default ``1e-8``).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"jacobian", "losses"})

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8) -> None:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1), got {beta}.")
        if not beta_sigma >= 0.0:
            raise ValueError(f"`beta_sigma` must be non-negative, got {beta_sigma}.")
        if not eps > 0.0:
            raise ValueError(f"`eps` must be positive, got {eps}.")
        super().__init__()
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)
        self.average: Tensor | None
        self.steps: int
        self.declare_state("average", None)  # the averaged log-gradients
        self.declare_state("steps", 0, convert=int)

    def forward(self, inputs: MethodInputs) -> Tensor:
        matrix, losses = inputs.jacobian, inputs.losses
        assert matrix is not None and losses is not None
        check_loss_values("DB-MTL", losses, matrix.shape[0])
        check_matching_state("DB-MTL", self.average, matrix)
        log_gradients = matrix / (losses.to(matrix) + self.eps).unsqueeze(1)
        steps = self.steps + 1
        rate = self.beta / steps**self.beta_sigma
        previous = torch.zeros_like(matrix) if self.average is None else self.average.to(matrix)
        average = log_gradients + rate * (previous - log_gradients)
        norms = average.norm(dim=1)
        scales = norms.max() / (norms + self.eps)
        self.average, self.steps = average, steps
        return scales @ average

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, beta_sigma={self.beta_sigma:g}, eps={self.eps:g}"
