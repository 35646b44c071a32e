"""Argument checks and defaults that several methods share.

Method-level helpers (not numerics, which live in :mod:`jdoptim.linalg`): the ridge ``reg_eps``
of the methods that solve a quadratic program on the equilibrated Gramian (UPGrad, DualProj,
MGDA, CAGrad, FairGrad, NashMTL), the preference vector of the methods that weight the
losses by one (UPGrad, DualProj, Aligned-MTL, SDMGrad), and the simplex weights that the
cross-batch methods carry from one call to the next (MoDo, SDMGrad).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._bases import check_preference

__all__ = ["check_reg_eps", "kept_or_uniform", "preference_or_uniform"]


def check_reg_eps(reg_eps: float) -> None:
    """Refuse a ridge ``reg_eps`` that is not a finite float in ``(0, 1)``."""
    if not (isinstance(reg_eps, (int, float)) and math.isfinite(reg_eps) and 0.0 < reg_eps < 1.0):
        raise ValueError(f"reg_eps must be a float in (0, 1), got {reg_eps!r}.")


def preference_or_uniform(pref_vector: Tensor | None, gramian: Tensor) -> Tensor:
    """The checked preference ``p ∈ R^m`` on ``gramian``'s dtype and device, or the uniform
    ``p = 1/m`` when ``pref_vector`` is ``None``."""
    m = gramian.shape[0]
    check_preference(pref_vector, m)
    if pref_vector is None:
        return torch.full((m,), 1.0 / m, dtype=gramian.dtype, device=gramian.device)
    return pref_vector.to(dtype=gramian.dtype, device=gramian.device)


def kept_or_uniform(kept: Tensor | None, like: Tensor, method: str) -> Tensor:
    """The weights ``w ∈ R^m`` a method kept from its previous call, on ``like``'s dtype and
    device (``m = like.shape[0]``), or the uniform ``1/m`` on the first call; kept weights of
    another number of losses are refused, naming ``method`` and the fix."""
    m = like.shape[0]
    if kept is None:
        return like.new_full((m,), 1.0 / m)
    if kept.shape != (m,):
        raise ValueError(
            f"{method} kept {kept.shape[0]} weights and now receives {m} losses: call reset()."
        )
    return kept.to(like)
