"""Storing a computed gradient in ``.grad`` without a copy when that is safe.

``loss.backward()`` moves the gradient it computed into ``.grad`` (no copy) when nothing else
holds it; a step that computes gradients with ``torch.autograd.grad`` can do the same, which
saves a copy of every gradient (about 1 ms per step for a 0.5M-parameter model on CPU). A
gradient is copied instead when storing it would be unsafe:

* it does not own exactly its memory: a row of a Jacobian block (storing it would keep the
  whole block alive), or an expanded tensor (``expand`` of a scalar: entries overlap, so an
  in-place ``.grad`` update would fail or be wrong);
* it is not contiguous (``.grad`` should have a dense layout, as ``backward()`` gives);
* its memory was already stored for another parameter in the same step (autograd returns the
  same tensor for both inputs of an addition), or is one of the step's own tensors that a
  gradient can pass through unchanged (the output gradient given to ``autograd.grad``, e.g. the
  weights kept in the ``StepRecord``, reach a parameter as they are through ``clone``): two
  holders of the same memory would see each other's in-place updates.

One exception to the first point: the contiguous views of a tensor the caller names as
*partitioned* (a fresh product that no one else holds, whose views given here do not overlap,
such as the engine's one product ``wᵀ R`` split into the held parameters' updates) are stored as
they are. Their ``.grad`` then share that tensor's memory without overlapping, as DDP's
``gradient_as_bucket_view`` gradients do: in-place updates of one ``.grad`` (clipping,
accumulation, ``zero_()``) touch no other, and the memory is the gradients' own. This saves one
copy per such parameter (28 on GPT-2 tiny, about 4 µs each inside a step).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["store_gradients"]


def _owns_exactly(grad: Tensor) -> bool:
    return (
        grad.is_contiguous()
        and grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
    )


def store_gradients(
    pairs: Sequence[tuple[Tensor, Tensor]],
    reserved: Sequence[Tensor | None] = (),
    partitioned: Sequence[Tensor] = (),
) -> None:
    """``param.grad += grad`` for each pair (``param.grad = grad`` when it is ``None``: the
    gradient itself when safe, else a copy; see the module docstring), cast to the parameter's
    dtype. ``reserved``: the tensors whose memory must never become a ``.grad``;
    ``partitioned``: fresh tensors of the caller's whose views among the gradients do not
    overlap and may be stored as they are (see the module docstring)."""
    held = [t for t in reserved if t is not None]
    parts_of = {id(t) for t in partitioned}
    # Until the first view comes by, a gradient that is no view (``_base is None``) and is
    # contiguous owns its memory unless it is a reserved tensor, the base of one, or was stored
    # already: checked by identity, without reading storages (reading one costs a few µs per
    # gradient, visible on small models). From the first view on, every stored gradient's
    # storage address is remembered and checked, as the module docstring says.
    seen = {id(t) for t in held} | {id(t._base) for t in held if t._base is not None}
    taken: set[int] | None = None  # the storages' addresses, read only when a view comes by
    with torch.no_grad():
        for param, grad in pairs:
            if grad.dtype != param.dtype:
                grad = grad.to(dtype=param.dtype)
            if param.grad is not None:
                param.grad.add_(grad)
                continue
            if grad.layout is not torch.strided:  # e.g. a sparse embedding gradient
                param.grad = grad
                continue
            base = grad._base
            if parts_of and base is not None and id(base) in parts_of and grad.is_contiguous():
                param.grad = grad  # a part of a partitioned tensor: no copy
                continue
            fresh = taken is None and base is None and id(grad) not in seen
            if fresh and grad.is_contiguous():
                seen.add(id(grad))
                param.grad = grad
                continue
            if taken is None:  # from here on, every stored gradient's storage is remembered
                taken = {t.untyped_storage().data_ptr() for t in held}
                taken |= {
                    p.grad.untyped_storage().data_ptr()
                    for p, _ in pairs
                    if p.grad is not None and p.grad.layout is torch.strided
                }
            address = grad.untyped_storage().data_ptr()
            if address in taken or not _owns_exactly(grad):
                grad = grad.clone(memory_format=torch.contiguous_format)
            elif address:  # an empty gradient has no memory to share
                taken.add(address)
            param.grad = grad
