r"""MoDo: Multi-Objective gradient with Double sampling (Chen, Fernando, Ying & Chen, 2024,
"Three-Way Trade-Off in Multi-Objective Learning: Optimization, Generalization and
Conflict-Avoidance", JMLR 25).

MoDo keeps weights ``λ`` on the simplex and moves them by a projected gradient step on
``½‖Jᵀλ‖² + ½ρ‖λ‖²``, with the expectation of ``J Jᵀ`` estimated without bias from two
**independent** mini-batches: ``A = J₁ J₂ᵀ`` (``E[A] = E[J] E[J]ᵀ``, whereas one batch's
``J Jᵀ`` is biased by the gradients' variance, which breaks the method's guarantee):

.. math::  λ \leftarrow Π_Δ\bigl(λ - γ\,(A λ + ρ λ)\bigr), \qquad λ_0 = \mathbf 1/m ,

and the update is ``d = Σᵢ λᵢ ∇ℓᵢ`` on the mean of the two batches' losses (two batches, eq. 2.9b)
or on a third batch (three batches, as in LibMTL). ``Π_Δ`` is the Euclidean projection onto the
simplex. Defaults ``γ = 0.1``, ``ρ = 0.1`` (TorchJD's).

With :class:`jdoptim.JDOptimizer`: ``opt.step(losses_1, extra_batches=[losses_2])`` or
``opt.step(losses_1, extra_batches=[losses_2, losses_3])`` (see :mod:`jdoptim.updates.cross_batch`).
Standalone: ``MoDoWeighting()(J1 @ J2.T)``. **State**: ``λ`` (``state_dict``, :meth:`reset`).
"""

from __future__ import annotations

from torch import Tensor

from ..linalg.simplex import project_onto_simplex
from ._inputs import CrossBatchWeighting, InputWeightedAggregator, MethodInputs
from ._mixins import Stateful, _NonDifferentiable
from .arguments import kept_or_uniform
from .state import CheckpointedState, DeclaredState


class MoDoWeighting(_NonDifferentiable, CheckpointedState, Stateful, CrossBatchWeighting):
    """Weights of MoDo from ``A = J₁ J₂ᵀ`` (see the module docstring).

    Args:
        gamma: step size ``γ > 0`` of the weights (default ``0.1``).
        rho: ``ℓ₂`` regularisation ``ρ ≥ 0`` of the weights (default ``0.1``).
    """

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        if not gamma > 0.0:
            raise ValueError(f"`gamma` must be positive, got {gamma}.")
        if not rho >= 0.0:
            raise ValueError(f"`rho` must be non-negative, got {rho}.")
        super().__init__()
        self.gamma = float(gamma)
        self.rho = float(rho)
        self._weights: Tensor | None
        self.declare_state("_weights", None)

    def forward(self, inputs: MethodInputs) -> Tensor:
        cross = inputs.cross
        assert cross is not None
        weights = kept_or_uniform(self._weights, cross, "MoDo")
        step = cross @ weights + self.rho * weights
        self._weights = project_onto_simplex(weights - self.gamma * step)
        return self._weights

    def extra_repr(self) -> str:
        return f"gamma={self.gamma:g}, rho={self.rho:g}"


class MoDo(_NonDifferentiable, DeclaredState, Stateful, InputWeightedAggregator):
    """MoDo for :class:`jdoptim.JDOptimizer` (which feeds it ``J₁J₂ᵀ`` from ``extra_batches``).

    Args: see :class:`MoDoWeighting`.
    """

    weighting: MoDoWeighting

    def __init__(self, gamma: float = 0.1, rho: float = 0.1) -> None:
        super().__init__(MoDoWeighting(gamma, rho))
