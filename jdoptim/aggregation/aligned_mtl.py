r"""Aligned-MTL (Senushkin, Patakin, Kuznetsov & Konushin, 2023, "Independent Component Alignment
for Multi-Task Learning", CVPR).

Aligned-MTL replaces the gradients by an orthogonal system of equal norms, the one closest to
them (an orthogonal Procrustes problem), so that the condition number of the aligned system is 1.
From the eigendecomposition of the Gramian ``G = V Λ Vᵀ`` restricted to its ``r`` positive
eigenvalues ``λ₁ ≥ … ≥ λ_r`` (those above ``λ₁·m·10·eps(dtype)`` and above ten times the rounding
noise a negative eigenvalue shows, see :func:`._scaling.rank_cutoff`), the balance transformation is

.. math::  B = σ \, V_r Λ_r^{-1/2} V_rᵀ, \qquad \hat J = B J, \qquad
           d = \hat Jᵀ p = Jᵀ (B p), \quad w = B p,

where ``p`` is the preference vector and ``σ`` the scale of the aligned singular values, chosen
by ``scale_mode``:

- ``"min"`` (default, as in the paper and its reference code): ``σ = √λ_r``, the smallest
  singular value of ``J``: the aligned system is never larger than the original.
- ``"median"``: ``σ = √median(λ)`` (lower median for an even ``r``).
- ``"rmse"``: ``σ = √mean(λ)``, the root mean square of the singular values.

The paper's code sums the aligned gradients (``p = 1``); the default here is ``p = 1/m`` (the mean,
as for the other weightings of this library), which only divides the update by ``m``. Weights are
invariant to scaling ``G``, so ``A(cJ) = c A(J)``; they are permutation equivariant. A zero
Gramian gives zero weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import rank_cutoff, scale_free
from .arguments import preference_or_uniform

SCALE_MODES = ("min", "median", "rmse")


def _check_scale_mode(scale_mode: str) -> None:
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode must be one of {SCALE_MODES}, got {scale_mode!r}.")


class AlignedMTLWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`AlignedMTL`: ``w = σ V_r Λ_r^{-1/2} V_rᵀ p``.

    Args:
        pref_vector: preference ``p ∈ R^m`` (default ``None``: ``1/m`` for every loss).
        scale_mode: ``"min"`` (default), ``"median"`` or ``"rmse"`` (see the module docstring).
    """

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: str = "min") -> None:
        super().__init__()
        _check_scale_mode(scale_mode)
        self.pref_vector = pref_vector
        self.scale_mode = scale_mode

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        preference = preference_or_uniform(self.pref_vector, gramian).to(dtype=torch.float64)
        m = gramian.shape[0]
        g = gramian.to(dtype=torch.float64)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (g + g.T))
        top = eigenvalues.max() if m else torch.zeros((), dtype=torch.float64)
        keep = eigenvalues > rank_cutoff(eigenvalues, m * 10.0 * torch.finfo(gramian.dtype).eps)
        if m == 0 or not keep.any() or top <= 0.0:
            return torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        kept_values = eigenvalues[keep]
        kept_vectors = eigenvectors[:, keep]
        if self.scale_mode == "min":
            sigma_squared = kept_values.min()
        elif self.scale_mode == "median":
            sigma_squared = kept_values.median()
        else:
            sigma_squared = kept_values.mean()
        coefficients = torch.sqrt(sigma_squared / kept_values) * (kept_vectors.T @ preference)
        return (kept_vectors @ coefficients).to(dtype=gramian.dtype)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, scale_mode={self.scale_mode!r}"


class AlignedMTL(_NonDifferentiable, GramianWeightedAggregator):
    """Aggregator of :class:`AlignedMTLWeighting`: ``d = Jᵀ B p``.

    Args:
        pref_vector: see :class:`AlignedMTLWeighting`.
        scale_mode: see :class:`AlignedMTLWeighting`.
    """

    def __init__(self, pref_vector: Tensor | None = None, scale_mode: str = "min") -> None:
        super().__init__(AlignedMTLWeighting(pref_vector, scale_mode))
