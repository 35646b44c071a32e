r"""Finiteness checks for the hot path of a step, at the cost of one reduction each.

A floating-point sum is finite only if every term is: ``NaN`` propagates, ``+inf`` and ``-inf``
give ``inf`` or ``NaN``. So ``Σ x`` being finite proves that every entry of ``x`` is finite, and
only a non-finite sum needs the entry-wise test (which then tells a non-finite entry from a sum
that merely overflowed). ``torch.isfinite(x).all()`` costs five tensor operations; on the small
tensors of a step (losses, a Gramian, weights) the operations themselves are the cost.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["all_finite", "is_finite"]


def is_finite(tensor: Tensor) -> bool:
    """Whether every entry of the floating-point ``tensor`` is finite (one synchronisation).

    A tensor on the ``meta`` device has no values to check: it is refused with a clear error
    (instead of torch's ``Tensor.item() cannot be called on meta tensors``).
    """
    if tensor.is_meta:
        raise ValueError(
            "Cannot check a tensor on the 'meta' device for NaN or infinite values: it holds "
            "shapes but no values. Materialise the model (e.g. `model.to_empty(device='cpu')` "
            "and initialise it) before training."
        )
    if math.isfinite((tensor.detach() if tensor.requires_grad else tensor).sum().item()):
        return True
    return bool(torch.isfinite(tensor).all())


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, from one fused max-norm per tensor (NaN and
    ±inf propagate through ``max |x|``, and it cannot overflow) and one synchronisation."""
    tensors = [t for t in tensors if t.numel()]  # an empty gradient has nothing to check
    if not tensors:
        return True
    norms: tuple[Tensor, ...] | list[Tensor]
    if len({(t.device, t.dtype) for t in tensors}) == 1 and hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(tensors, float("inf"))
    else:
        norms = [t.abs().max().float() for t in tensors]
    return is_finite(torch.stack(norms))
