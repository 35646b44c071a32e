"""The hook-based Gramian engine (see :mod:`jdoptim.autogram.engine`).

What lives here: the engine only. :class:`Engine` hooks the modules, records their calls on the
graph (``_records.py``, ``_graph.py``, ``_shared.py``), and one backward per step
(``_step.py``) gives the Gramian ``G = J Jᵀ`` layer by layer, never the full Jacobian, and then
the weighted update ``Σ wᵢ ∇ℓᵢ`` from the same output gradients (``low_memory=True``:
``_streaming.py`` takes each layer's term during the backward and gives the update by a second
backward pass); per-layer rules (``rules/``) say how each layer type gives its Gramian and
update, the generic rule covering the rest; ``_certify.py`` checks a new graph structure's
first step against autograd.

Who may import what: the engine imports :mod:`jdoptim.linalg` (Gramian reshapes, the
vmap-or-loop fallback) and the core modules (introspection), never a method
(:mod:`jdoptim.aggregation`, :mod:`jdoptim.scalarization`), an update computer,
:mod:`jdoptim.distributed` or the optimizer: it computes a Gramian and applies weights, and
does not know which method chose them. The update computer that pairs the engine with an
aggregator, ``GramianUpdate``, lives one layer up in :mod:`jdoptim.updates.gramian`;
``jdoptim.autogram.GramianUpdate`` and ``jdoptim.autogram.update`` still give it, imported on
first use only (a re-export for user code, the one import ``.importlinter`` lets through). The
contract is checked by ``lint-imports`` (``.importlinter``) and ``tests/test_layers.py``.
"""

from .engine import Engine, EngineRouteWarning
from .rules import LayerRule, register_rule

__all__ = ["Engine", "EngineRouteWarning", "GramianUpdate", "LayerRule", "register_rule"]


def __getattr__(name: str) -> object:
    """``GramianUpdate`` moved to :mod:`jdoptim.updates.gramian` (which imports this package):
    re-exported here on first use, through the compatibility module ``update.py``."""
    if name == "GramianUpdate":
        from .update import GramianUpdate

        return GramianUpdate
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
