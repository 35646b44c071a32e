"""The methods the demo compares: the summed loss, and JDOptimizer under the catalogue's methods.

The list comes from :mod:`jdoptim.catalog` (one entry per method): a method added there is known
to the demo, its ``--list`` and ``--methods all``.
"""

from __future__ import annotations

from .. import catalog
from ..aggregation import Aggregator
from ..scalarization import Scalarizer

__all__ = [
    "BASELINE",
    "DEFAULT_METHODS",
    "KNOWN_AGGREGATORS",
    "available",
    "describe",
    "make_aggregator",
    "min_losses",
    "resolve",
    "runs_on_toy",
]

BASELINE = "Sum"
"""The plain step: ``sum(losses).backward(); optimizer.step()`` (no JDOptimizer). It is also what
``JDOptimizer(optimizer, Sum())`` computes, so the demo runs the plain step under that name."""

KNOWN_AGGREGATORS: tuple[str, ...] = tuple(
    entry.name for entry in catalog.METHODS if entry.in_demo and entry.name != BASELINE
)
"""The catalogue's one-batch aggregation methods (the cross-batch ones need several batches per
step, and the scalarizers are listed but not run)."""
DEFAULT_METHODS: tuple[str, ...] = (BASELINE, "UPGrad", "MGDA", "PCGrad", "CAGrad", "NashMTL")


def available() -> tuple[str, ...]:
    """Every method the demo can run: the baseline, then the catalogue's aggregators."""
    return (BASELINE, *KNOWN_AGGREGATORS)


def describe() -> str:
    """The ``--list`` text: one line per method (needs, state, what it does, paper)."""
    header = (
        f"{len(catalog.METHODS)} methods (jdoptim.aggregation, then jdoptim.scalarization). "
        "Columns: name, what a step gives it (the Gramian G = J J^T, the full Jacobian J, also "
        "the loss values, J1 J2^T of two batches, or the losses alone for one backward), "
        "whether it keeps state between steps, what it does, its paper.\n"
        f"In the demo, {BASELINE} is the plain step on the summed loss (no JDOptimizer); the demo "
        f"runs {len(KNOWN_AGGREGATORS) + 1} of them (--methods all).\n"
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


def runs_on_toy(name: str) -> bool:
    """Whether the two-objective toy suits ``name``: two losses, and no use of the loss values
    (GradNorm, IMTL, DB-MTL and MoCo assume positive losses; the toy's are zero or negative in
    places)."""
    if name == BASELINE:
        return True
    entry = catalog.by_name(name)
    return entry.min_losses <= 2 and "losses" not in entry.needs


def make_aggregator(name: str, m: int) -> Aggregator | Scalarizer:
    """A fresh aggregator (or, for a loss-only method, scalarizer) for ``m`` losses
    (stateful ones must not be shared between runs)."""
    return catalog.by_name(name).build(m)
