"""Compatibility path: ``GramianUpdate`` moved to :mod:`jdoptim.updates.gramian`.

It pairs the engine with an aggregator, so it lives with the other update computers, one layer
above the engine (which never imports it); ``jdoptim.autogram.update`` re-exports those names
unchanged, so that code written against it keeps working; the library itself imports the new
modules only (checked by ``tests/test_layers.py``).
"""

from __future__ import annotations

from ..updates.gramian import (
    GramianUpdate,
)

__all__ = [
    "GramianUpdate",
]
