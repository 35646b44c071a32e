"""Compatibility path: moved to :mod:`jdoptim.updates.features` (``features=``).

The update computer of representation-level JD lives there, with the other update computers;
``jdoptim.features_step`` re-exports those names unchanged, so that code written against it
keeps working; the library itself imports the new modules only (checked by
``tests/test_layers.py``).
"""

from __future__ import annotations

from .updates.features import (
    FeaturesUpdate,
    HeadsMap,
    check_features,
    feature_jacobian,
    map_heads,
    one_heads_pass,
    per_loss_pass,
)

__all__ = [
    "FeaturesUpdate",
    "HeadsMap",
    "check_features",
    "feature_jacobian",
    "map_heads",
    "one_heads_pass",
    "per_loss_pass",
]
