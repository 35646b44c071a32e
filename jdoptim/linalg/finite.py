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


#: Tensors with more entries than this are reduced by their own sum on CPU (see all_finite).
_OWN_SUM_ABOVE = 2048


def all_finite(tensors: list[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, from one reduction per tensor and one
    synchronisation when they are.

    ``NaN`` and ``±inf`` propagate through a sum and a 2-norm, so a finite result proves finite
    entries; either can also overflow on huge finite entries, and only then are the tensors
    tested entry-wise. The 2-norms come from one fused ``torch._foreach_norm``. On CPU, where
    that call loops over the tensors, a tensor of more than ``_OWN_SUM_ABOVE`` entries is summed
    instead: the sum reads it at about twice the speed of the norm (a 0.5M-parameter MLP's
    gradients: 0.1 ms less per step, 1.5% of its plain step; 50 matrices of 768 × 768: 4.1 ms
    against 6.6 ms), while for small tensors one fused call beats one call each. (The max-norm,
    which cannot overflow, costs about nine times the 2-norm on CPU.)
    """
    summed: list[Tensor] = []  # (on CPU) the large tensors
    normed: list[Tensor] = []  # the others
    sum_above = _OWN_SUM_ABOVE if tensors and tensors[0].device.type == "cpu" else None
    for tensor in tensors:
        if tensor.layout is torch.sparse_coo:  # finite when its stored values are
            tensor = tensor._values()
        size = tensor.numel()
        if size:  # an empty gradient has nothing to check (a complex one is normed: real)
            large = sum_above is not None and size > sum_above and not tensor.is_complex()
            (summed if large else normed).append(tensor)
    if not summed and not normed:
        return True
    with torch.no_grad():
        reductions = [t.sum() for t in summed] + list(_norms(normed))
    if is_finite(torch.stack(reductions)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in summed + normed)  # NaN/inf, or overflow


def _norms(tensors: list[Tensor]) -> tuple[Tensor, ...] | list[Tensor]:
    """The 2-norms of ``tensors``: one fused call where they share a device and dtype."""
    if not tensors:
        return []
    if len({(t.device, t.dtype) for t in tensors}) == 1 and hasattr(torch, "_foreach_norm"):
        return torch._foreach_norm(tensors, 2.0)
    return [torch.linalg.vector_norm(t).float() for t in tensors]
