"""Compatibility path: moved to :mod:`jdoptim.updates.cross_batch` (``extra_batches=``).

The update computer of the methods of two or three batches lives there; ``jdoptim.cross_batch``
re-exports those names unchanged, so that code written against it keeps working; the library
itself imports the new modules only (checked by ``tests/test_layers.py``).
"""

from __future__ import annotations

from .updates.cross_batch import (
    CrossBatches,
    CrossBatchUpdate,
    cross_weighting,
)

__all__ = [
    "CrossBatchUpdate",
    "CrossBatches",
    "cross_weighting",
]
