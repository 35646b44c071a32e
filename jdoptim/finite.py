"""Moved to :mod:`jdoptim.linalg.finite` (the shared numerics); this name is kept so that
``from jdoptim.finite import is_finite`` keeps working."""

from __future__ import annotations

from .linalg.finite import all_finite, is_finite

__all__ = ["all_finite", "is_finite"]
