r"""SDMGrad: Stochastic Direction-oriented Multi-objective Gradient descent (Xiao, Ban & Ji,
2023, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic Algorithms",
NeurIPS, arXiv:2305.18409).

SDMGrad looks for the update closest to a preferred direction ``Jᵀw̃`` (default ``w̃ = 1/m``, the
mean gradient) while reducing the common descent objective: the weights ``w`` on the simplex
minimise ``½‖Jᵀ(w + λw̃)‖²``, estimated without bias from two **independent** mini-batches
through ``A = J₁ J₂ᵀ``. Each call runs ``n_iter`` steps of projected stochastic gradient with
heavy-ball momentum from the previous call's ``w`` (``w₀ = 1/m``):

.. math::  v \leftarrow μ v + Ã (w + λ \tilde w), \qquad w \leftarrow Π_Δ(w - η v),
           \qquad Ã = A / (\bar s^2 + 10^{-8}), \quad \bar s = \tfrac1m\textstyle\sum_i
           \sqrt{\max(A_{ii}, 0)} ,

(``v`` restarts at each call; the normalisation ``Ã`` makes ``η`` scale-free, as in the authors'
code, §6.1) and returns ``(w + λ w̃) / (1 + λ)``. Defaults ``η = 10``, ``μ = 0.5``,
``n_iter = 20``, ``λ = 0.3`` (TorchJD's and LibMTL's).

With :class:`jdoptim.JDOptimizer`: ``opt.step(losses_1, extra_batches=[losses_2, losses_3])``
(the paper's ``ξ, ξ', ζ``; see :mod:`jdoptim.updates.cross_batch`). Standalone:
``SDMGradWeighting()(J1 @ J2.T)``. **State**: ``w`` (``state_dict``, :meth:`reset`).
"""

from __future__ import annotations

from torch import Tensor

from ..linalg.simplex import project_onto_simplex
from ._inputs import CrossBatchWeighting, InputWeightedAggregator, MethodInputs
from ._mixins import Stateful, _NonDifferentiable
from .arguments import kept_or_uniform, preference_or_uniform
from .state import CheckpointedState, DeclaredState


class SDMGradWeighting(_NonDifferentiable, CheckpointedState, Stateful, CrossBatchWeighting):
    """Weights of SDMGrad from ``A = J₁ J₂ᵀ`` (see the module docstring).

    Args:
        lr: step size ``η > 0`` of the inner solver (default ``10``).
        momentum: momentum ``μ ∈ [0, 1)`` of the inner solver (default ``0.5``).
        n_iter: inner iterations per call (default ``20``).
        lambda_: pull ``λ ≥ 0`` towards the preferred direction (default ``0.3``).
        pref_vector: the preference ``w̃`` (default ``None``: ``1/m``).
    """

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        if not lr > 0.0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if not (isinstance(n_iter, int) and n_iter >= 1):
            raise ValueError(f"`n_iter` must be a positive integer, got {n_iter!r}.")
        if not lambda_ >= 0.0:
            raise ValueError(f"`lambda_` must be non-negative, got {lambda_}.")
        if pref_vector is not None and pref_vector.dim() != 1:
            raise ValueError("`pref_vector` must be a 1-D tensor (one entry per loss).")
        super().__init__()
        self.lr, self.momentum, self.n_iter = float(lr), float(momentum), n_iter
        self.lambda_ = float(lambda_)
        self.pref_vector = pref_vector
        self._weights: Tensor | None
        self.declare_state("_weights", None)

    def forward(self, inputs: MethodInputs) -> Tensor:
        cross = inputs.cross
        assert cross is not None
        preferred = preference_or_uniform(self.pref_vector, cross)
        weights = kept_or_uniform(self._weights, cross, "SDMGrad")
        scale = cross.diagonal().clamp(min=0.0).sqrt().mean()
        normalized = cross / (scale.square() + 1e-8)
        velocity = None
        for _ in range(self.n_iter):
            step = normalized @ (weights + self.lambda_ * preferred)
            velocity = step if velocity is None else self.momentum * velocity + step
            weights = project_onto_simplex(weights - self.lr * velocity)
        self._weights = weights
        return (weights + self.lambda_ * preferred) / (1.0 + self.lambda_)

    def extra_repr(self) -> str:
        return (
            f"lr={self.lr:g}, momentum={self.momentum:g}, n_iter={self.n_iter}, "
            f"lambda_={self.lambda_:g}"
        )


class SDMGrad(_NonDifferentiable, DeclaredState, Stateful, InputWeightedAggregator):
    """SDMGrad for :class:`jdoptim.JDOptimizer` (which feeds it ``J₁J₂ᵀ`` from ``extra_batches``).

    Args: see :class:`SDMGradWeighting`.
    """

    weighting: SDMGradWeighting

    def __init__(
        self,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        lambda_: float = 0.3,
        pref_vector: Tensor | None = None,
    ) -> None:
        super().__init__(SDMGradWeighting(lr, momentum, n_iter, lambda_, pref_vector))
