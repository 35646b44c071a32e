r"""PCGrad: Projecting Conflicting Gradients (Yu et al., 2020, "Gradient Surgery for Multi-Task
Learning", NeurIPS, arXiv:2001.06782).

For each task ``i``, start from ``g_i' = g_i`` and visit the other tasks ``j ≠ i`` in some order;
whenever ``g_i'`` conflicts with the *original* gradient ``g_j`` (``⟨g_i', g_j⟩ < 0``), remove the
conflicting component:

.. math::  g_i' \leftarrow g_i' - \frac{\langle g_i', g_j\rangle}{\lVert g_j\rVert^2}\, g_j .

The update is ``d = Σ_i g_i'`` (Algorithm 1 of the paper; ``reduction="mean"`` divides by ``m``).

**Gramian form.** Every ``g_i'`` stays a linear combination of the rows of ``J``: ``g_i' = C_i J``
with ``C ∈ R^{m×m}`` starting at the identity. Projecting ``g_i'`` on ``g_j`` subtracts
``(⟨g_i', g_j⟩/G_jj) e_j`` from ``C_i``, and ``⟨g_i', g_j⟩ = (C G)_{ij}``. The weights are the
column sums of ``C`` (divided by ``m`` for ``"mean"``). We keep ``C G`` up to date with one
rank-one row update per projection, so that a call costs ``O(m)`` batched operations of size
``m × m`` (``O(m³)`` flops in total): at step ``k`` every task ``i`` is projected on its ``k``-th
task at once.

**Order.** The paper visits the other tasks "in random order" inside its loop over ``i``; we draw an
independent uniform permutation for every task at every call (``order="random"``, the default),
from the method's own seeded generator. ``order="fixed"`` visits ``j = 0, 1, …, m-1`` for every
``i``: deterministic, but not permutation-equivariant for ``m ≥ 3`` (the order follows the
indices).

**Reduction.** The paper (Algorithm 1) and its TensorFlow code sum the projected gradients; several
PyTorch re-implementations average them. The default is ``reduction="sum"``, as in the paper.

**Non-conflict.** The paper's guarantee (Theorem 1) is for two tasks: with ``m = 2``,
``⟨d, g_i⟩ = ⟨g_i', g_i⟩ ≥ 0`` for both tasks. For ``m ≥ 3`` PCGrad may return a conflicting ``d``.

Zero gradients are never projected on (their direction is undefined); they receive weight ``1``
like any other unchanged gradient.
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


def _pcgrad_coefficients(gramian: Tensor, orders: Tensor) -> Tensor:
    """Return ``C`` with ``g_i' = C_i J`` after PCGrad's projections in the given orders.

    ``orders[i]`` lists the tasks visited by task ``i`` (``i`` itself is skipped).
    """
    m = gramian.shape[0]
    rows = torch.arange(m, device=gramian.device)
    coefficients = torch.eye(m, dtype=gramian.dtype, device=gramian.device)
    projected_gramian = gramian.clone()  # (C G)[i, j] = ⟨g_i', g_j⟩
    squared_norms = gramian.diagonal()
    for step in range(m):
        targets = orders[:, step]
        dots = projected_gramian[rows, targets]
        norms = squared_norms[targets]
        project = (targets != rows) & (dots < 0) & (norms > 0)
        scale = torch.where(project, dots / torch.where(norms > 0, norms, 1.0), 0.0)
        coefficients[rows, targets] -= scale
        projected_gramian -= scale.unsqueeze(1) * gramian[targets]
    return coefficients


class PCGradWeighting(_NonDifferentiable, _SeededRandomness, Stateful, Weighting):
    """Weights of :class:`PCGrad` from the Gramian alone (see the module docstring).

    Args:
        reduction: ``"sum"`` (default, as in the paper) or ``"mean"`` of the projected gradients.
        order: ``"random"`` (default): each task visits the others in a fresh uniformly random
            order at every call; ``"fixed"``: in index order.
        seed: seed of the method's own generator (default: drawn from the global RNG).
        generator: a CPU ``torch.Generator`` to use instead of ``seed``.
    """

    def __init__(
        self,
        reduction: Reduction = "sum",
        order: Order = "random",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        check_reduction(reduction)
        check_order(order)
        super().__init__()
        self.reduction = reduction
        self.order = order
        self._init_generator(seed, generator)

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        orders = self._random_orders(m, self.order, gramian.device)
        weights = _pcgrad_coefficients(gramian, orders).sum(dim=0)
        return weights / m if self.reduction == "mean" else weights

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, order={self.order!r}"


class PCGrad(_NonDifferentiable, DeclaredState, Stateful, GramianWeightedAggregator):
    """PCGrad aggregator: ``d = Jᵀ PCGradWeighting(J Jᵀ)`` (Yu et al., 2020).

    Args: see :class:`PCGradWeighting`.
    """

    weighting: PCGradWeighting

    def __init__(
        self,
        reduction: Reduction = "sum",
        order: Order = "random",
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(PCGradWeighting(reduction, order, seed=seed, generator=generator))
