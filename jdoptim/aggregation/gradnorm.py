r"""GradNorm: Gradient Normalization (Chen, Badrinarayanan, Lee & Rabinovich, 2018, "GradNorm:
Gradient Normalization for Adaptive Loss Balancing in Deep Multitask Networks", ICML).

GradNorm learns one weight ``wᵢ > 0`` per loss (``Σᵢ wᵢ = m``) so that the weighted gradients'
norms on a chosen layer ``W`` (the paper: the last shared layer) follow each task's relative
training rate. With ``nᵢ = ‖∇_W ℓᵢ‖`` (from the layer's Gramian, ``nᵢ = √G^W_ii``),
``G^W_i = wᵢ nᵢ``, their mean ``Ḡ``, the loss ratios ``L̃ᵢ = ℓᵢ / ℓᵢ(0)`` (``ℓ(0)``: the first
call's losses) and the relative inverse training rates ``rᵢ = L̃ᵢ / mean(L̃)``:

.. math::  L_{grad} = Σᵢ \bigl| wᵢ nᵢ - Ḡ\, rᵢ^{α} \bigr|, \qquad
           \frac{∂L_{grad}}{∂wᵢ} = \mathrm{sign}(wᵢ nᵢ - Ḡ rᵢ^{α})\, nᵢ

(the target ``Ḡ rᵢ^α`` is held constant, as in the paper). Each call returns the current ``w``
(``d = Σᵢ wᵢ gᵢ``), then takes one gradient step ``w ← w − lr ∂L_grad/∂w`` and renormalises
``Σᵢ wᵢ = m``; weights that the step would make non-positive are floored at ``10⁻⁶`` before the
renormalisation (the paper does not say; they must stay positive). ``α`` is the asymmetry
(default ``1.5``, the paper's most used value); ``lr`` the weights' step size (default
``0.025``; the paper trains ``w`` with the network's optimizer, here GradNorm owns ``w`` so that
no parameter group is needed).

``layer``: a module or parameters whose gradient norms are used (JDOptimizer computes their
Gramian with one extra batched backward from the losses to that layer, cheap for a last shared
layer); ``None`` uses the Gramian of all the shared parameters (LibMTL's choice).
Needs the Gramian and the loss values. **State**: ``w``, ``ℓ(0)`` (``state_dict``, ``reset``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import Tensor, nn

from ._inputs import InputWeightedAggregator, InputWeighting, MethodInputs
from ._mixins import Stateful, _NonDifferentiable
from .state import CheckpointedState, DeclaredState

_FLOOR = 1e-6


def _layer_parameters(layer: nn.Module | Iterable[Tensor] | None) -> tuple[Tensor, ...]:
    if layer is None:
        return ()
    params = tuple(layer.parameters()) if isinstance(layer, nn.Module) else tuple(layer)
    if not params or not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError(
            "GradNorm's layer must be a module with trainable parameters, or trainable tensors "
            "(e.g. model.trunk[-1], the last shared layer)."
        )
    return params


class GradNormWeighting(_NonDifferentiable, CheckpointedState, Stateful, InputWeighting):
    """Weights of :class:`GradNorm` (see the module docstring).

    Args:
        alpha: asymmetry ``α ≥ 0`` (default ``1.5``).
        lr: step size of the weights (default ``0.025``).
        layer: module or parameters whose gradient norms are balanced (default: all shared).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"gramian", "losses"})

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        layer: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        if not alpha >= 0.0:
            raise ValueError(f"`alpha` must be non-negative, got {alpha}.")
        if not lr > 0.0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        super().__init__()
        self.alpha, self.lr = float(alpha), float(lr)
        self._layer = _layer_parameters(layer)  # a tuple: not registered, not in state_dict
        if self._layer:
            self.needs = frozenset({"gramian", "losses", "layer_gramian"})  # type: ignore[misc]
        self.loss_weights: Tensor | None
        self.initial_losses: Tensor | None
        self.declare_state("loss_weights", None)
        self.declare_state("initial_losses", None)

    def layer_params(self) -> tuple[Tensor, ...]:
        """The parameters whose Gramian JDOptimizer passes as ``layer_gramian``."""
        return self._layer

    def forward(self, inputs: MethodInputs) -> Tensor:
        gramian = inputs.layer_gramian if self._layer else inputs.gramian
        losses = inputs.losses
        assert gramian is not None and losses is not None
        m = gramian.shape[0]
        values = losses.to(dtype=torch.float64, device=gramian.device)
        self._start(values, m)
        assert self.loss_weights is not None and self.initial_losses is not None
        weights = self.loss_weights
        norms = gramian.diagonal().to(torch.float64).clamp(min=0.0).sqrt()
        ratios = values / self.initial_losses
        rates = ratios / ratios.mean()
        target = (weights * norms).mean() * rates.pow(self.alpha)
        gradient = torch.sign(weights * norms - target) * norms
        stepped = (weights - self.lr * gradient).clamp(min=_FLOOR)
        self.loss_weights = stepped * (m / stepped.sum())
        return weights.to(gramian.dtype)

    def _start(self, values: Tensor, m: int) -> None:
        if values.shape != (m,):
            raise ValueError(f"GradNorm got {tuple(values.shape)} loss values for {m} losses.")
        if self.loss_weights is None:
            if not bool((values > 0).all()):
                raise ValueError(
                    "GradNorm divides by the first step's losses: they must be positive, got "
                    f"{values.tolist()}."
                )
            self.loss_weights = torch.ones(m, dtype=torch.float64, device=values.device)
            self.initial_losses = values.clone()
        elif self.loss_weights.shape != (m,):
            raise ValueError(
                f"GradNorm learned {self.loss_weights.shape[0]} weights and now receives {m} "
                "losses: call reset()."
            )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, lr={self.lr:g}, layer_params={len(self._layer)}"


class GradNorm(_NonDifferentiable, DeclaredState, Stateful, InputWeightedAggregator):
    """GradNorm: ``d = Σᵢ wᵢ gᵢ`` with learned weights (see :class:`GradNormWeighting`).

    Args: see :class:`GradNormWeighting`.
    """

    weighting: GradNormWeighting

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        layer: nn.Module | Iterable[Tensor] | None = None,
    ) -> None:
        super().__init__(GradNormWeighting(alpha, lr, layer))
