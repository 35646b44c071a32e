r"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui & Stainer, 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS).

Each gradient ``g_i`` gets the score

.. math::  s(i) = \sum_{j \in N_i} \lVert g_i - g_j\rVert^2,

where ``N_i`` are the ``m - f - 2`` gradients closest to ``g_i`` (other than ``g_i`` itself) and
``f = n_byzantine``. Krum returns the gradient of lowest score; Multi-Krum (``n_selected > 1``)
averages the ``n_selected`` gradients of lowest scores. Ties are broken by the lower index.

**Gramian form.** ``‖g_i - g_j‖² = G_ii + G_jj - 2 G_ij``, so the scores, and hence the weights
(``1/n_selected`` on the selected rows, ``0`` elsewhere), depend on the Gramian only.

The score needs ``m ≥ f + 3`` gradients; the paper's Byzantine-resilience guarantee needs
``m > 2f + 2``. Non-differentiable (a selection).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import _NonDifferentiable
from ._scaling import scale_free


def _check_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int ≥ {minimum}, got {value!r}.")


class KrumWeighting(_NonDifferentiable, Weighting):
    """Weights ``1/n_selected`` on the ``n_selected`` rows of lowest Krum score.

    Args:
        n_byzantine: the number ``f ≥ 0`` of gradients that may be arbitrary (no default).
        n_selected: how many rows to average (default ``1``: Krum; more: Multi-Krum).
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        _check_int("n_byzantine", n_byzantine, 0)
        _check_int("n_selected", n_selected, 1)
        super().__init__()
        self.n_byzantine = n_byzantine
        self.n_selected = n_selected

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        if m < self.n_byzantine + 3:
            raise ValueError(
                f"Krum with n_byzantine={self.n_byzantine} scores each gradient by its "
                f"m - n_byzantine - 2 nearest neighbours and needs at least "
                f"{self.n_byzantine + 3} losses, got {m}."
            )
        if self.n_selected > m:
            raise ValueError(f"n_selected={self.n_selected} exceeds the number of losses ({m}).")
        diagonal = gramian.diagonal()
        distances = (diagonal.unsqueeze(0) + diagonal.unsqueeze(1) - 2.0 * gramian).clamp(min=0.0)
        distances.fill_diagonal_(torch.inf)
        n_neighbours = m - self.n_byzantine - 2
        scores = distances.sort(dim=1).values[:, :n_neighbours].sum(dim=1)
        selected = scores.sort(stable=True).indices[: self.n_selected]
        weights = torch.zeros(m, dtype=gramian.dtype, device=gramian.device)
        weights[selected] = 1.0 / self.n_selected
        return weights

    def extra_repr(self) -> str:
        return f"n_byzantine={self.n_byzantine}, n_selected={self.n_selected}"


class Krum(_NonDifferentiable, GramianWeightedAggregator):
    """(Multi-)Krum aggregator: ``d = Jᵀ KrumWeighting(J Jᵀ)``.

    Args: see :class:`KrumWeighting`.
    """

    def __init__(self, n_byzantine: int, n_selected: int = 1) -> None:
        super().__init__(KrumWeighting(n_byzantine, n_selected))
