r"""IMTL: Impartial Multi-Task Learning, both parts (Liu, Li, Kuang, Xue, Chen, Yang, Liao &
Zhang, 2021, "Towards Impartial Multi-task Learning", ICLR).

**IMTL-L** (loss balance) scales each loss by a learnable ``e^{sᵢ}`` and trains ``sᵢ`` on
``e^{sᵢ} ℓᵢ − sᵢ``, whose minimum over ``sᵢ`` is at ``e^{sᵢ} ℓᵢ = 1``: every scaled loss is
driven to the same value. **IMTL-G** (gradient balance) then weights the scaled losses'
gradients ``g'ᵢ = e^{sᵢ} gᵢ`` so that the update has equal projections on all unit gradients
(:mod:`jdoptim.aggregation.imtl_g`). Together, with ``E = diag(e^{s})`` and ``G' = E G E``:

.. math::  α = \mathrm{IMTLG}(G'), \qquad w = E α \quad (d = Σᵢ αᵢ g'ᵢ = Σᵢ wᵢ gᵢ),

then the scales take one gradient step on ``Σᵢ (e^{sᵢ} ℓᵢ − sᵢ)``:
``sᵢ ← sᵢ − η (e^{sᵢ} ℓᵢ − 1)``, ``s₀ = 0``. The weights of a step use the scales from before
it (as LibMTL, whose optimizer updates ``s`` after the step). The paper trains ``s`` with the
network's optimizer; here IMTL owns ``s`` and takes plain gradient steps of size ``lr``
(default ``1e-2``, our choice) so that it needs no parameter group.

Needs the Gramian and the loss values (:class:`~jdoptim.aggregation.MethodInputs`); works with
``opt.step(losses, features=z)``. **State**: ``s`` (``state_dict``, :meth:`IMTLWeighting.reset`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from ._inputs import InputWeightedAggregator, InputWeighting, MethodInputs
from ._mixins import Stateful, _NonDifferentiable
from .imtl_g import IMTLGWeighting
from .state import CheckpointedState, DeclaredState


class IMTLWeighting(_NonDifferentiable, CheckpointedState, Stateful, InputWeighting):
    """Weights of :class:`IMTL` (see the module docstring).

    Args:
        lr: step size ``η > 0`` of the log-scales ``s`` (default ``1e-2``).
    """

    needs: ClassVar[frozenset[str]] = frozenset({"gramian", "losses"})

    def __init__(self, lr: float = 1e-2) -> None:
        if not lr > 0.0:
            raise ValueError(f"`lr` must be positive, got {lr}.")
        super().__init__()
        self.lr = float(lr)
        self.log_scales: Tensor | None
        self.declare_state("log_scales", None)
        self._gradient_part = IMTLGWeighting()

    def forward(self, inputs: MethodInputs) -> Tensor:
        gramian, losses = inputs.gramian, inputs.losses
        assert gramian is not None and losses is not None
        m = gramian.shape[0]
        if losses.shape != (m,):
            raise ValueError(f"IMTL got {tuple(losses.shape)} loss values for {m} losses.")
        log_scales = self.log_scales
        if log_scales is None:
            log_scales = torch.zeros(m, dtype=torch.float64, device=gramian.device)
        elif log_scales.shape != (m,):
            raise ValueError(
                f"IMTL learned {log_scales.shape[0]} loss scales and now receives {m} losses: "
                "call reset()."
            )
        scales = log_scales.exp().to(gramian)
        alpha = self._gradient_part(gramian * torch.outer(scales, scales))
        values = losses.to(dtype=torch.float64, device=log_scales.device)
        self.log_scales = log_scales - self.lr * (log_scales.exp() * values - 1.0)
        return alpha * scales

    def extra_repr(self) -> str:
        return f"lr={self.lr:g}"


class IMTL(_NonDifferentiable, DeclaredState, Stateful, InputWeightedAggregator):
    """IMTL (IMTL-L and IMTL-G): ``d = Σᵢ wᵢ gᵢ``, ``w = IMTLWeighting(G, losses)``.

    Args: see :class:`IMTLWeighting`.
    """

    weighting: IMTLWeighting

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__(IMTLWeighting(lr))
