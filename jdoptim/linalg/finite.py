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
    """Whether every entry of every tensor is finite, from one fused 2-norm per tensor and one
    synchronisation when they are.

    ``NaN`` and ``±inf`` propagate through ``‖x‖₂``, so finite norms prove finite entries. A norm
    can also overflow on huge finite entries: only then are the tensors tested entry-wise. (The
    2-norm, not the max-norm that cannot overflow: on CPU ``torch._foreach_norm`` with ``inf``
    costs about nine times as much, ~1.8 ms against ~0.2 ms on a 0.5M-parameter model.)
    """
    # A sparse COO tensor (a sparse embedding's gradient) is finite when its stored values are.
    tensors = [t._values() if t.layout is torch.sparse_coo else t for t in tensors]
    tensors = [t for t in tensors if t.numel()]  # an empty gradient has nothing to check
    if not tensors:
        return True
    norms: tuple[Tensor, ...] | list[Tensor]
    if len({(t.device, t.dtype) for t in tensors}) == 1 and hasattr(torch, "_foreach_norm"):
        norms = torch._foreach_norm(tensors, 2.0)
    else:
        norms = [torch.linalg.vector_norm(t).float() for t in tensors]
    if is_finite(torch.stack(norms)):
        return True
    return all(bool(torch.isfinite(t).all()) for t in tensors)  # NaN/inf, or an overflowed norm
