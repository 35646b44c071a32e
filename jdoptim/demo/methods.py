"""The methods the demo compares: the summed loss, and JDOptimizer under the catalogue's methods.

The list comes from :mod:`jdoptim.catalog` (one entry per method): a method added there is known
to the demo, its ``--list`` and ``--methods all``.
"""

from __future__ import annotations

from .. import catalog
from ..aggregation import Aggregator

__all__ = [
    "BASELINE",
    "DEFAULT_METHODS",
    "KNOWN_AGGREGATORS",
    "available",
    "describe",
    "make_aggregator",
    "min_losses",
    "resolve",
]

BASELINE = "Sum"
"""The plain step: ``sum(losses).backward(); optimizer.step()`` (no JDOptimizer). It is also what
``JDOptimizer(optimizer, Sum())`` computes, so the demo runs the plain step under that name."""

KNOWN_AGGREGATORS: tuple[str, ...] = tuple(
    entry.name for entry in catalog.METHODS if entry.name != BASELINE
)
DEFAULT_METHODS: tuple[str, ...] = (BASELINE, "UPGrad", "MGDA", "PCGrad", "CAGrad", "NashMTL")


def available() -> tuple[str, ...]:
    """Every method the demo can run: the baseline, then the catalogue's aggregators."""
    return (BASELINE, *KNOWN_AGGREGATORS)


def describe() -> str:
    """The ``--list`` text: one line per method (needs, state, what it does, paper)."""
    header = (
        f"{len(catalog.METHODS)} methods (jdoptim.aggregation). Columns: name, what a step gives "
        "it (the Gramian G = J J^T only, or the full Jacobian J), whether it keeps state "
        "between steps, what it does, its paper.\n"
        f"In the demo, {BASELINE} is the plain step on the summed loss (no JDOptimizer).\n"
    )
    return header + catalog.format_catalog()


def resolve(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Canonical spellings of ``names`` (case-insensitive; ``"all"`` for every method); raises
    ``ValueError`` on an unknown name."""
    by_lower = {name.lower(): name for name in available()}
    resolved: list[str] = []
    for name in names:
        if name.lower() == "all":
            resolved.extend(available())
            continue
        if name.lower() not in by_lower:
            raise ValueError(f"Unknown method {name!r}; choose among: {', '.join(available())}.")
        resolved.append(by_lower[name.lower()])
    return tuple(dict.fromkeys(resolved))


def min_losses(name: str) -> int:
    """The fewest losses ``name`` accepts with the demo's arguments (Krum, TrimmedMean: 3)."""
    return 1 if name == BASELINE else catalog.by_name(name).min_losses


def make_aggregator(name: str, m: int) -> Aggregator:
    """A fresh aggregator for ``m`` losses (stateful ones must not be shared between runs)."""
    return catalog.by_name(name).build(m)
