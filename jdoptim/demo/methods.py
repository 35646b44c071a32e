"""The methods the demo compares: the summed loss, and JDOptimizer under named aggregators."""

from __future__ import annotations

from collections.abc import Callable

from .. import aggregation
from ..aggregation import Aggregator

__all__ = [
    "BASELINE",
    "DEFAULT_METHODS",
    "KNOWN_AGGREGATORS",
    "available",
    "make_aggregator",
    "resolve",
]

BASELINE = "Sum"
"""The plain step: ``sum(losses).backward(); optimizer.step()`` (no JDOptimizer)."""

# Aggregators the demo knows how to build with sensible defaults, in display order.
_FACTORIES: dict[str, Callable[[], Aggregator]] = {
    "UPGrad": lambda: aggregation.UPGrad(),
    "MGDA": lambda: aggregation.MGDA(),
    "PCGrad": lambda: aggregation.PCGrad(seed=0),
    "CAGrad": lambda: aggregation.CAGrad(c=0.4),
    "NashMTL": lambda: aggregation.NashMTL(),
    "DualProj": lambda: aggregation.DualProj(),
    "IMTLG": lambda: aggregation.IMTLG(),
    "AlignedMTL": lambda: aggregation.AlignedMTL(),
    "FairGrad": lambda: aggregation.FairGrad(),
    "GradVac": lambda: aggregation.GradVac(seed=0),
    "ConFIG": lambda: aggregation.ConFIG(),
    "Mean": lambda: aggregation.Mean(),
}
KNOWN_AGGREGATORS: tuple[str, ...] = tuple(_FACTORIES)
DEFAULT_METHODS: tuple[str, ...] = (BASELINE, "UPGrad", "MGDA", "PCGrad", "CAGrad", "NashMTL")


def available() -> tuple[str, ...]:
    """Every method the demo can run: the baseline, then the known aggregators."""
    return (BASELINE, *KNOWN_AGGREGATORS)


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


def make_aggregator(name: str) -> Aggregator:
    """A fresh aggregator (stateful ones must not be shared between runs)."""
    return _FACTORIES[name]()
