"""Compatibility path: moved to :mod:`jdoptim.updates.method`.

The routes of ``features=`` and ``extra_batches=`` (``RoutedUpdate``, ``prepare_method``) live
there; ``jdoptim.method_step`` re-exports those names unchanged, so that code written against it
keeps working; the library itself imports the new modules only (checked by
``tests/test_layers.py``).
"""

from __future__ import annotations

from .updates.method import (
    CrossBatches,
    MethodStep,
    RoutedUpdate,
    check_method_arguments,
    check_method_step,
    prepare_method,
)

__all__ = [
    "CrossBatches",
    "MethodStep",
    "RoutedUpdate",
    "check_method_arguments",
    "check_method_step",
    "prepare_method",
]
