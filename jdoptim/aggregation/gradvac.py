r"""GradVac: Gradient Vaccine (Wang, Tsvetkov, Firat & Cao, 2021, "Gradient Vaccine: Investigating
and Improving Multi-task Optimization in Massively Multilingual Models", ICLR, arXiv:2010.05874).

GradVac generalises PCGrad: instead of only removing conflicts (a target cosine similarity of
``0``), it pulls each pair of gradients towards an adaptive target similarity ``φ̂_ij``, an
exponential moving average (EMA) of the similarities seen during training. For each task ``i``,
start from ``g_i' = g_i`` and visit the other tasks ``j ≠ i`` in some order; with
``φ_ij = cos(g_i', g_j)``, if ``φ_ij < φ̂_ij``:

.. math::  g_i' \leftarrow g_i' + \frac{\lVert g_i'\rVert\,\bigl(\hat φ_{ij}\sqrt{1-φ_{ij}^2}
           - φ_{ij}\sqrt{1-\hat φ_{ij}^2}\bigr)}{\lVert g_j\rVert\sqrt{1-\hat φ_{ij}^2}}\; g_j ,

which makes ``cos(g_i', g_j) = φ̂_ij`` exactly; then, whether or not it corrected,
``φ̂_ij ← (1-β) φ̂_ij + β φ_ij`` (with the ``φ_ij`` measured before the correction). The update is
``d = Σ_i g_i'`` (``reduction="mean"`` divides by ``m``). The EMAs start at ``0``, so the first
step is a PCGrad-like step that only removes conflicts.

**Simplification.** The paper keeps one EMA per pair of tasks *and per parameter group* (e.g. per
layer) and applies the correction group-wise. We keep one EMA per pair of tasks for the whole
shared parameter vector (the "whole model" granularity of the paper's ablation), which is what makes
the method a function of the Gramian.

**Gramian form.** As in :mod:`~jdoptim.aggregation.pcgrad`, ``g_i' = C_i J`` with ``C`` starting at
the identity; ``⟨g_i', g_j⟩ = (C G)_{ij}``, ``‖g_i'‖² = (C G C ᵀ)_{ii} = ⟨(C G)_i, C_i⟩`` and
``‖g_j‖² = G_jj``. A correction adds its coefficient to ``C_ij``. All tasks take their ``k``-th
correction at once (``O(m)`` batched steps of size ``m × m``).

**Defaults.** ``beta = 0.01`` (the paper's value, ``β = 10⁻²``; LibMTL uses ``0.5``), ``order =
"random"`` (a fresh permutation per task at each call, from the method's own seeded generator),
``reduction = "sum"`` as in the paper.

**State.** ``φ̂`` (``[m, m]``, created at the first call) and the generator's state are declared
state (:mod:`jdoptim.aggregation.state`): in ``state_dict()``, forgotten by ``reset()``.
Pairs involving a zero gradient (undefined cosine) are neither corrected nor averaged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import Stateful, _NonDifferentiable
from ._randomness import _SeededRandomness, check_order, check_reduction
from ._scaling import scale_free
from .state import DeclaredState

Reduction = Literal["sum", "mean"]
Order = Literal["random", "fixed"]
_MIN_SINE_SQUARED = 1e-12


def _gradvac_coefficients(
    gramian: Tensor, orders: Tensor, targets: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Return ``C`` (``g_i' = C_i J``) and the updated EMA matrix ``φ̂``."""
    m = gramian.shape[0]
    rows = torch.arange(m, device=gramian.device)
    coefficients = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    projected_gramian = gramian.clone()  # (C G)[i, j] = ⟨g_i', g_j⟩
    other_norms = gramian.diagonal().clamp(min=0.0).sqrt()
    new_targets = targets.clone()
    for step in range(m):
        others = orders[:, step]
        own_norms = (projected_gramian * coefficients).sum(dim=1).clamp(min=0.0).sqrt()
        norms_j = other_norms[others]
        valid = (others != rows) & (own_norms > 0) & (norms_j > 0)
        denominator = torch.where(valid, own_norms * norms_j, 1.0)
        cosines = (projected_gramian[rows, others] / denominator).clamp(-1.0, 1.0)
        target = targets[rows, others]
        target_sine = (1.0 - target.square()).clamp(min=_MIN_SINE_SQUARED).sqrt()
        cosine_sine = (1.0 - cosines.square()).clamp(min=0.0).sqrt()
        scale = own_norms * (target * cosine_sine - cosines * target_sine)
        scale = scale / (torch.where(valid, norms_j, 1.0) * target_sine)
        scale = torch.where(valid & (cosines < target), scale, 0.0)
        coefficients[rows, others] += scale
        projected_gramian += scale.unsqueeze(1) * gramian[others]
        updated = (1.0 - beta) * target + beta * cosines
        new_targets[rows, others] = torch.where(valid, updated, target)
    return coefficients, new_targets


class GradVacWeighting(_NonDifferentiable, _SeededRandomness, Stateful, Weighting):
    """Weights of :class:`GradVac` from the Gramian alone (see the module docstring).

    Args:
        beta: EMA rate ``β ∈ [0, 1]`` of the target similarities (default ``0.01``, the paper's).
        reduction: ``"sum"`` (default, as in the paper) or ``"mean"`` of the corrected gradients.
        order: ``"random"`` (default) or ``"fixed"`` order in which each task visits the others.
        seed: seed of the method's own generator (default: drawn from the global RNG).
        generator: a CPU ``torch.Generator`` to use instead of ``seed``.
    """

    def __init__(
        self,
        beta: float = 0.01,
        reduction: Reduction = "sum",
        order: Order = "random",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
        check_reduction(reduction)
        check_order(order)
        super().__init__()
        self.beta = float(beta)
        self.reduction = reduction
        self.order = order
        self._init_generator(seed, generator)
        self.target_similarities: Tensor | None
        self.declare_state("target_similarities", None)

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        targets = self.target_similarities
        if targets is None:
            targets = torch.zeros(m, m, dtype=gramian.dtype, device=gramian.device)
        elif targets.shape != (m, m):
            raise ValueError(
                f"GradVac was used with {targets.shape[0]} losses and now receives {m}: its "
                "target similarities are per pair of losses. Call reset() to start over."
            )
        targets = targets.to(dtype=gramian.dtype, device=gramian.device)
        orders = self._random_orders(m, self.order, gramian.device)
        coefficients, self.target_similarities = _gradvac_coefficients(
            gramian, orders, targets, self.beta
        )
        weights = coefficients.sum(dim=0)
        return weights / m if self.reduction == "mean" else weights

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, reduction={self.reduction!r}, order={self.order!r}"


class GradVac(_NonDifferentiable, DeclaredState, Stateful, GramianWeightedAggregator):
    """GradVac aggregator: ``d = Jᵀ GradVacWeighting(J Jᵀ)`` (Wang et al., 2021).

    Args: see :class:`GradVacWeighting`.
    """

    weighting: GradVacWeighting

    def __init__(
        self,
        beta: float = 0.01,
        reduction: Reduction = "sum",
        order: Order = "random",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(GradVacWeighting(beta, reduction, order, seed=seed, generator=generator))
