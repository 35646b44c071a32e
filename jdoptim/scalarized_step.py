"""Compatibility path: moved to :mod:`jdoptim.updates.scalarized`.

The step of the loss-only methods (``ScalarizedStep``) lives there; ``jdoptim.scalarized_step``
re-exports those names unchanged, so that code written against it keeps working; the library
itself imports the new modules only (checked by ``tests/test_layers.py``).
"""

from __future__ import annotations

from .updates.scalarized import (
    ScalarizedStep,
    attach_learnable_parameters,
    make_scalarized_step,
)

__all__ = [
    "ScalarizedStep",
    "attach_learnable_parameters",
    "make_scalarized_step",
]
