"""torch's error types that the library tells apart, across the torch versions it supports."""

from __future__ import annotations

import torch

__all__ = ["OutOfMemoryError"]

#: ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError`` before torch 2.5): an allocator
#: failure, a ``RuntimeError`` that no fallback route should take for a failure of its own (a
#: slower exact route needs more memory, not less)
OutOfMemoryError: type[RuntimeError] = getattr(
    torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError
)
