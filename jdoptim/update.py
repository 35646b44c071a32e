"""Compatibility path: the update computers moved to :mod:`jdoptim.updates`.

The interface (``UpdateComputer``, ``UpdateResult``) and its helpers are in
:mod:`jdoptim.updates.base`, ``JacobianUpdate`` in :mod:`jdoptim.updates.jacobian`;
``jdoptim.update`` re-exports those names unchanged, so that code written against it keeps
working; the library itself imports the new modules only (checked by ``tests/test_layers.py``).
"""

from __future__ import annotations

from .updates.base import (
    NonFiniteJacobianError,
    UpdateComputer,
    UpdateResult,
    UpdateRoute,
    aggregate_jacobian,
    ensure_finite,
    gramian_weights,
    nonfinite_part,
    weigh,
)
from .updates.jacobian import (
    JacobianUpdate,
    gramian_of_blocks,
)

__all__ = [
    "JacobianUpdate",
    "NonFiniteJacobianError",
    "UpdateComputer",
    "UpdateResult",
    "UpdateRoute",
    "aggregate_jacobian",
    "ensure_finite",
    "gramian_of_blocks",
    "gramian_weights",
    "nonfinite_part",
    "weigh",
]
