r"""IMTL-G: the gradient part of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen, Yang,
Liao & Zhang, 2021, "Towards Impartial Multi-task Learning", ICLR).

IMTL-G chooses weights summing to one such that the update ``d = Jᵀw`` has the same projection on
every unit gradient ``uᵢ = gᵢ/‖gᵢ‖``: ``⟨uᵢ, d⟩ = c`` for all ``i``. Since
``⟨uᵢ, d⟩ = (Gw)ᵢ / √Gᵢᵢ``, this is ``G w = c s`` with ``s = (√G₁₁, …, √Gₘₘ)``, hence the closed
form in the Gramian

.. math::  w = \frac{G^{+} s}{\mathbf 1ᵀ G^{+} s}, \qquad s_i = \sqrt{G_{ii}},

which equals the paper's ``α₂:ₘ = g₁Uᵀ(DUᵀ)⁻¹``, ``α₁ = 1 − Σα₂:ₘ`` whenever ``G`` is invertible.

Rank deficiency (``m > n``, duplicated or zero gradients): ``G⁻¹`` is replaced by the
Moore–Penrose pseudo-inverse ``G⁺`` (eigenvalues below ``10·m·eps(dtype)·λ_max`` are treated as
zero), i.e. ``w`` is the minimum-norm least-squares solution of ``Gw ∝ s``. The equal-projection
property then holds exactly when ``s`` lies in the range of ``G`` and in the least-squares sense
otherwise. When ``1ᵀG⁺s`` vanishes (e.g. two exactly opposite gradients, where every direction
orthogonal to both has equal projections 0), the weights are all zero. Weights are invariant to
scaling ``G``, so ``A(cJ) = c A(J)`` for ``c > 0``; they are permutation equivariant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import scale_free


class IMTLGWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`IMTLG`: ``w = G⁺s / 1ᵀG⁺s`` with ``sᵢ = √Gᵢᵢ``. No hyperparameters."""

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        g = gramian.to(dtype=torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (g + g.T))
        top = eigenvalues.abs().max() if m else torch.zeros((), dtype=torch.float64)
        threshold = 10.0 * m * torch.finfo(gramian.dtype).eps * top
        keep = eigenvalues > threshold
        inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
        s = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
        v = eigenvectors @ (inverse * (eigenvectors.T @ s))
        total = v.sum()
        # 1ᵀG⁺s vanishes (relative to its size) only in degenerate configurations.
        if m == 0 or total.abs() <= 1e-12 * max(float(v.abs().sum()), 1e-300):
            return torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        return (v / total).to(dtype=gramian.dtype)


class IMTLG(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`IMTLGWeighting`: ``d = Jᵀw`` with equal projections on all ``uᵢ``."""

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
