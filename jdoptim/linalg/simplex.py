"""Euclidean projection onto the probability simplex (used by MoDo and SDMGrad)."""

from __future__ import annotations

import torch
from torch import Tensor


def project_onto_simplex(vector: Tensor) -> Tensor:
    r"""``argmin_{x ≥ 0, 1ᵀx = 1} ‖x − v‖``, the sort-based rule (Held, Wolfe & Crowder, 1974).

    The projection is ``xᵢ = max(vᵢ − θ, 0)`` where the threshold ``θ`` makes the entries sum to
    one: with ``u`` the entries of ``v`` in decreasing order, ``k`` is the largest index with
    ``u_k > (Σ_{j≤k} u_j − 1)/k`` and ``θ = (Σ_{j≤k} u_j − 1)/k``.
    """
    ordered, _ = torch.sort(vector, descending=True)
    cumulative = ordered.cumsum(dim=0) - 1.0
    counts = torch.arange(1, vector.shape[0] + 1, dtype=vector.dtype, device=vector.device)
    above = ordered > cumulative / counts
    k = int(above.nonzero().max()) if bool(above.any()) else 0
    threshold = cumulative[k] / (k + 1)
    return (vector - threshold).clamp(min=0.0)
