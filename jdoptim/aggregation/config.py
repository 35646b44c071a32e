r"""ConFIG: Conflict-Free Inverse Gradients (Liu, Chu, Thuerey, 2024, "ConFIG: Towards
Conflict-free Training of Physics Informed Neural Networks", arXiv:2408.11104).

With ``U`` the matrix of unit gradients (rows ``u_i = g_i/‖g_i‖``) and a preference ``p`` (default
all ones), ConFIG takes the direction whose projections on the unit gradients are proportional to
``p``, and rescales it by the sum of the gradients' projections on it:

.. math::  \hat g = U^{+} p, \qquad g_u = \hat g / \lVert \hat g\rVert, \qquad
           d = \Bigl(\sum_i \langle g_i, g_u\rangle\Bigr) g_u .

When the gradients are linearly independent, ``U ĝ = p > 0``, so ``d`` conflicts with no gradient
(``J d ≥ 0``), and it has equal cosines with every gradient for the default ``p``.

**Gramian form.** Let ``D = diag(‖g_i‖)`` (``√G_ii``) and ``N = U Uᵀ = D⁻¹ G D⁻¹`` (the cosine
matrix). The minimum-norm solution is ``ĝ = Uᵀ N⁺ p = Jᵀ c`` with ``c = D⁻¹ N⁺ p``. Then
``‖ĝ‖² = cᵀ G c`` and ``Σ_i ⟨g_i, ĝ⟩ = 1ᵀ G c``, so that

.. math::  d = Jᵀ w, \qquad w = \frac{1ᵀ G c}{cᵀ G c}\; c ,

with no ``J`` needed (the length rescaling is ``1ᵀGc / cᵀGc`` because
``Σ_i ⟨g_i, g_u⟩ ‖ĝ‖⁻¹ = 1ᵀGc / cᵀGc``). ``N⁺`` is computed by an eigendecomposition of the
symmetric ``N``, discarding eigenvalues below ``rcond × λ_max``; eigenvalues of ``N`` are
squared singular values of ``U``, so the cut-off (default ``m·√ε`` of the dtype) is what a
relative cut-off of about ``ε^{1/4}`` would be on ``U``. Zero gradients have no direction: their
unit gradient is taken to be ``0`` (they get weight ``0`` in ``c``). If every gradient is zero,
``w = 0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting, check_preference
from ._mixins import _NonDifferentiable


class ConFIGWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`ConFIG` from the Gramian alone (see the module docstring).

    Args:
        pref_vector: preference ``p ∈ R^m`` (default: all ones).
        rcond: relative eigenvalue cut-off of the pseudo-inverse of the cosine matrix (default:
            ``m·√ε`` of the Gramian's dtype).
    """

    def __init__(self, pref_vector: Tensor | None = None, rcond: float | None = None) -> None:
        if pref_vector is not None and (
            not isinstance(pref_vector, Tensor) or not torch.isfinite(pref_vector).all()
        ):
            raise ValueError("`pref_vector` must be a finite tensor with one entry per loss.")
        if rcond is not None and not rcond >= 0.0:
            raise ValueError(f"`rcond` must be non-negative, got {rcond}.")
        super().__init__()
        self.pref_vector = pref_vector
        self.rcond = rcond

    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        check_preference(self.pref_vector, m)
        if self.pref_vector is None:
            preference = torch.ones(m, dtype=gramian.dtype, device=gramian.device)
        else:
            preference = self.pref_vector.to(dtype=gramian.dtype, device=gramian.device)
        norms = gramian.diagonal().clamp(min=0.0).sqrt()
        inverse_norms = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        cosines = inverse_norms.unsqueeze(1) * gramian * inverse_norms.unsqueeze(0)
        cosines = 0.5 * (cosines + cosines.T)
        eigenvalues, eigenvectors = torch.linalg.eigh(cosines)
        rcond = self.rcond
        if rcond is None:
            rcond = m * torch.finfo(gramian.dtype).eps ** 0.5
        keep = eigenvalues > rcond * eigenvalues.max().clamp(min=0.0)
        inverse_eigenvalues = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
        solution = eigenvectors @ (inverse_eigenvalues * (eigenvectors.T @ preference))
        coefficients = inverse_norms * solution
        gramian_c = gramian @ coefficients
        squared_length = coefficients @ gramian_c
        if not squared_length > 0:
            return torch.zeros_like(coefficients)
        return coefficients * (gramian_c.sum() / squared_length)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, rcond={self.rcond}"


class ConFIG(_NonDifferentiable, GramianWeightedAggregator):
    """ConFIG aggregator: ``d = Jᵀ ConFIGWeighting(J Jᵀ)`` (Liu et al., 2024).

    Args: see :class:`ConFIGWeighting`.
    """

    def __init__(self, pref_vector: Tensor | None = None, rcond: float | None = None) -> None:
        super().__init__(ConFIGWeighting(pref_vector, rcond))
