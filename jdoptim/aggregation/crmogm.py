r"""CR-MOGM: weights smoothed by an exponential moving average (Zhou, Zhang, Jiang, Zhong, Gu &
Zhu, 2022, "On the Convergence of Stochastic Multi-Objective Gradient Manipulation and Beyond",
NeurIPS).

Wraps any weighting ``W``; with ``λ̂ₖ`` the weights ``W`` returns at call ``k``:

.. math::  λ_k = α\, λ_{k-1} + (1 - α)\, \hat λ_k ,

with ``λ₀ = initial_weights``, or ``λ₀ = λ̂₁`` when it is ``None`` (the first output is then
``λ̂₁`` whatever ``α``). ``α = 0`` returns ``W``'s weights unchanged, ``α = 1`` freezes them at
``λ₀``. The paper's Corollary 1 lets ``αₖ`` grow towards 1 as the learning rate decays: set
``weighting.alpha`` between steps (e.g. ``1 - lr / initial_lr``).

The aggregator is ``GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting()))``; a wrapped
:class:`~jdoptim.aggregation.InputWeighting` (one that needs the loss values, or ``J₁J₂ᵀ``)
receives its inputs unchanged. **State**: ``λ_{k-1}`` (``state_dict``, :meth:`reset`, which
also resets the wrapped weighting when it is :class:`~jdoptim.aggregation.Stateful`).
"""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from ._bases import Weighting
from ._inputs import InputWeighting, MethodInputs
from ._mixins import Stateful
from .state import CheckpointedState


class CRMOGMWeighting(CheckpointedState, Stateful, InputWeighting):
    """An EMA of the weights of ``weighting`` (see the module docstring).

    Args:
        weighting: the wrapped weighting.
        alpha: EMA coefficient ``α ∈ [0, 1]`` on the previous weights (default ``0.9``).
        initial_weights: ``λ₀`` (shape ``[m]``), or ``None`` to start from the first weights.
    """

    needs: ClassVar[frozenset[str]] = frozenset()

    def __init__(
        self, weighting: Weighting, alpha: float = 0.9, initial_weights: Tensor | None = None
    ) -> None:
        if not isinstance(weighting, Weighting):
            raise TypeError(f"CRMOGMWeighting wraps a Weighting, got {type(weighting).__name__}.")
        if initial_weights is not None and initial_weights.dim() != 1:
            raise ValueError("`initial_weights` must be a 1-D tensor (one weight per loss).")
        super().__init__()
        self.weighting = weighting
        self.alpha = alpha
        self.initial_weights = initial_weights
        self._previous: Tensor | None  # λ_{k-1}; reset() also resets a stateful wrapped method
        self.declare_state("_previous", None)
        # What the wrapped method needs is what this one needs.
        inner = weighting.needs if isinstance(weighting, InputWeighting) else {"gramian"}
        self.needs = frozenset(inner)  # type: ignore[misc]

    def __call__(self, inputs: MethodInputs | Tensor) -> Tensor:
        if isinstance(inputs, Tensor) and "cross" in self.needs:
            inputs = MethodInputs(cross=inputs)  # a bare tensor is what the wrapped method takes
        return super().__call__(inputs)

    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"`alpha` must be in [0, 1], got {value}.")
        self._alpha = float(value)

    def forward(self, inputs: MethodInputs) -> Tensor:
        if isinstance(self.weighting, InputWeighting):
            current = self.weighting(inputs)
        else:
            assert inputs.gramian is not None
            current = self.weighting(inputs.gramian)
        previous = self._start(current)
        self._previous = self._alpha * previous + (1.0 - self._alpha) * current
        return self._previous

    def _start(self, current: Tensor) -> Tensor:
        m = current.shape[0]
        if self._previous is None:
            if self.initial_weights is None:
                return current
            if self.initial_weights.shape != (m,):
                raise ValueError(
                    f"`initial_weights` has shape {tuple(self.initial_weights.shape)} but there "
                    f"are {m} losses."
                )
            return self.initial_weights.to(dtype=current.dtype, device=current.device)
        if self._previous.shape != (m,):
            raise ValueError(
                f"CRMOGMWeighting averaged {self._previous.shape[0]} weights and now receives "
                f"{m}: call reset() before changing the number of losses."
            )
        return self._previous.to(dtype=current.dtype, device=current.device)

    def layer_params(self) -> tuple[Tensor, ...]:
        """The wrapped method's layer parameters (GradNorm's ``layer``), if it names any."""
        inner = getattr(self.weighting, "layer_params", None)
        return () if inner is None else tuple(inner())

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, alpha={self._alpha:g}"
