"""The hook-based Gramian engine (see :mod:`jdoptim.autogram.engine`)."""

from .engine import Engine, EngineRouteWarning
from .rules import LayerRule, register_rule
from .update import GramianUpdate

__all__ = ["Engine", "EngineRouteWarning", "GramianUpdate", "LayerRule", "register_rule"]
