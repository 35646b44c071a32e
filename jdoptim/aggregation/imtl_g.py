r"""IMTL-G: the gradient part of Impartial Multi-Task Learning (Liu, Li, Kuang, Xue, Chen, Yang,
Liao & Zhang, 2021, "Towards Impartial Multi-task Learning", ICLR).

IMTL-G chooses weights summing to one such that the update ``d = Jᵀw`` has the same projection on
every unit gradient ``uᵢ = gᵢ/‖gᵢ‖``: ``⟨uᵢ, d⟩ = c`` for all ``i``. Since
``⟨uᵢ, d⟩ = (Gw)ᵢ / √Gᵢᵢ``, this is ``G w = c s`` with ``s = (√G₁₁, …, √Gₘₘ)``, hence the closed
form in the Gramian

.. math::  w = \frac{G^{+} s}{\mathbf 1ᵀ G^{+} s}, \qquad s_i = \sqrt{G_{ii}},

which equals the paper's ``α₂:ₘ = g₁Uᵀ(DUᵀ)⁻¹``, ``α₁ = 1 − Σα₂:ₘ`` whenever ``G`` is invertible.

**Equilibrated form.** With ``S = diag(s)`` and the cosine matrix ``N = S⁻¹GS⁻¹``, the condition
``Gw = cs`` reads ``N x = c1`` for ``x = Sw``; so ``w ∝ S⁻¹N⁻¹1``, which is what is computed (in
float64): ``N`` has a unit diagonal, so its conditioning does not suffer from gradients of very
different norms, as ``G``'s does (rows of norms ``1e-3 … 1e3`` give ``cond(G) ≈ 1e12``).

Rank deficiency (``m > n``, duplicated or zero gradients): ``N⁻¹`` is replaced by the
Moore–Penrose pseudo-inverse ``N⁺`` (eigenvalues below ``10·m·eps(dtype)·λ_max``, or below
ten times the rounding noise a negative eigenvalue shows, are treated as zero; see
:func:`._scaling.rank_cutoff`), i.e. ``x`` is the minimum-norm least-squares solution of
``Nx ∝ 1``; a zero gradient has no direction and gets weight ``0``. The equal-projection
property then holds exactly when ``1`` lies in the range of ``N`` and in the least-squares sense
otherwise. When ``N⁺1`` vanishes (e.g.
two exactly opposite gradients, where every direction orthogonal to both has equal projections
0; numerically: ``1``'s projection on the kept eigenvectors is below ``10·m·eps·‖1‖``) or
``1ᵀS⁻¹N⁺1`` does, the weights are all zero. Weights are invariant to scaling ``G``, so
``A(cJ) = c A(J)`` for ``c > 0`` (``scale_degree = 0``, see :mod:`._scaling`); they are
permutation equivariant.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import rank_cutoff, scale_free


class IMTLGWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`IMTLG`: ``w = S⁻¹N⁺1 / 1ᵀS⁻¹N⁺1`` with ``S = diag(√Gᵢᵢ)`` and
    ``N = S⁻¹GS⁻¹`` (``= G⁺s / 1ᵀG⁺s`` for an invertible ``G``). No hyperparameters."""

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        epsilon = torch.finfo(gramian.dtype).eps
        g = gramian.to(dtype=torch.float64)
        norms = torch.sqrt(torch.clamp(torch.diagonal(g), min=0.0))
        inverse_norms = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        cosines = inverse_norms.unsqueeze(1) * g * inverse_norms.unsqueeze(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (cosines + cosines.T))
        if m == 0:
            return torch.zeros(0, dtype=gramian.dtype, device=gramian.device)
        keep = eigenvalues > rank_cutoff(eigenvalues, 10.0 * m * epsilon)
        ones = (norms > 0).to(torch.float64)  # a zero gradient has no projection to equalise
        projections = torch.where(keep, eigenvectors.T @ ones, 0.0)
        zeros = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        if not projections.norm() > 10.0 * m * epsilon * ones.norm():
            return zeros  # N⁺1 = 0
        inverse = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
        v = inverse_norms * (eigenvectors @ (inverse * projections))
        total = v.sum()
        # 1ᵀS⁻¹N⁺1 vanishes (relative to its size) only in degenerate configurations.
        if total.abs() <= 1e-12 * max(float(v.abs().sum()), 1e-300):
            return zeros
        return (v / total).to(dtype=gramian.dtype)


class IMTLG(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`IMTLGWeighting`: ``d = Jᵀw`` with equal projections on all ``uᵢ``."""

    def __init__(self) -> None:
        super().__init__(IMTLGWeighting())
