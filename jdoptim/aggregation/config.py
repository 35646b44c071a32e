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
``Σ_i ⟨g_i, g_u⟩ ‖ĝ‖⁻¹ = 1ᵀGc / cᵀGc``). ``N⁺`` is computed, in float64, by an
eigendecomposition of the symmetric ``N``, discarding eigenvalues below
``max(rcond × λ_max, 10 |λ_min|)`` (default ``rcond = √ε`` of the Gramian's dtype; the second
term, where ``N`` has a negative eigenvalue, is the rounding noise of a Gramian accumulated over
many parameters, see :func:`._scaling.rank_cutoff`). Eigenvalues of ``N`` are the squared
singular values of ``U``, so directions of ``U`` with a relative singular value down to
``ε^{1/4}`` are kept (``0.019`` in float32: a condition number of 54; ``1.2·10⁻⁴`` in float64).
Zero gradients have no direction:
their unit gradient is taken to be ``0``
(they get weight ``0`` in ``c``). If every gradient is zero, ``w = 0``.

**Where ``U⁺p = 0``** (e.g. two exactly opposite gradients with ``p = 1``: no direction has
equal positive projections on both), the method's limit is ``d = 0``: near such a point
``ĝ`` grows without bound while ``Σ⟨gᵢ, g_u⟩`` tends to ``0``. Numerically, ``p``'s projection on
the kept eigenvectors is then rounding noise, which the normalisation ``ĝ/‖ĝ‖`` would blow up to
an arbitrary unit direction (depending, e.g., on the order of the rows); a projection below
``10·m·ε·‖p‖`` is therefore taken as ``0``, and so is ``d``.

The weights do not depend on the scale of the gradients (``scale_degree = 0``; see
:mod:`._scaling`); float16/bfloat16 Gramians are computed in float32.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg.finite import is_finite
from ._bases import GramianWeightedAggregator, Weighting, check_preference
from ._mixins import _NonDifferentiable
from ._scaling import rank_cutoff, scale_free


class ConFIGWeighting(_NonDifferentiable, Weighting):
    """Weights of :class:`ConFIG` from the Gramian alone (see the module docstring).

    Args:
        pref_vector: preference ``p ∈ R^m`` (default: all ones).
        rcond: relative eigenvalue cut-off of the pseudo-inverse of the cosine matrix (default:
            ``√ε`` of the Gramian's dtype; see the module docstring).
    """

    scale_degree = 0.0

    def __init__(self, pref_vector: Tensor | None = None, rcond: float | None = None) -> None:
        if pref_vector is not None and (
            not isinstance(pref_vector, Tensor) or not is_finite(pref_vector)
        ):
            raise ValueError("`pref_vector` must be a finite tensor with one entry per loss.")
        if rcond is not None and not rcond >= 0.0:
            raise ValueError(f"`rcond` must be non-negative, got {rcond}.")
        super().__init__()
        self.pref_vector = pref_vector
        self.rcond = rcond

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        check_preference(self.pref_vector, m)
        epsilon = torch.finfo(gramian.dtype).eps
        g = gramian.to(torch.float64)
        if self.pref_vector is None:
            preference = torch.ones(m, dtype=torch.float64, device=g.device)
        else:
            preference = self.pref_vector.to(dtype=torch.float64, device=g.device)
        norms = g.diagonal().clamp(min=0.0).sqrt()
        inverse_norms = torch.where(norms > 0, 1.0 / torch.where(norms > 0, norms, 1.0), 0.0)
        cosines = inverse_norms.unsqueeze(1) * g * inverse_norms.unsqueeze(0)
        eigenvalues, eigenvectors = torch.linalg.eigh(0.5 * (cosines + cosines.T))
        rcond = epsilon**0.5 if self.rcond is None else self.rcond
        keep = eigenvalues > rank_cutoff(eigenvalues, rcond)
        projections = torch.where(keep, eigenvectors.T @ preference, 0.0)
        if not projections.norm() > 10.0 * m * epsilon * preference.norm():
            return torch.zeros(m, dtype=gramian.dtype, device=gramian.device)  # U⁺p = 0
        inverse_eigenvalues = torch.where(keep, 1.0 / torch.where(keep, eigenvalues, 1.0), 0.0)
        coefficients = inverse_norms * (eigenvectors @ (inverse_eigenvalues * projections))
        gramian_c = g @ coefficients
        squared_length = coefficients @ gramian_c
        if not squared_length > 0:
            return torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        weights = coefficients * (gramian_c.sum() / squared_length)
        return weights.to(gramian.dtype)

    def extra_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        return f"pref_vector={pref}, rcond={self.rcond}"


class ConFIG(_NonDifferentiable, GramianWeightedAggregator):
    """ConFIG aggregator: ``d = Jᵀ ConFIGWeighting(J Jᵀ)`` (Liu et al., 2024).

    Args: see :class:`ConFIGWeighting`.
    """

    def __init__(self, pref_vector: Tensor | None = None, rcond: float | None = None) -> None:
        super().__init__(ConFIGWeighting(pref_vector, rcond))
