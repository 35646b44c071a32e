"""The catalogue of aggregation methods: one entry per method, in one place.

Each :class:`MethodEntry` says what the method needs from a step (the Gramian ``G = J Jᵀ`` only,
or the full Jacobian ``J``), whether it keeps state between steps, whether its update provably
conflicts with no loss's gradient, what it does in one line, its paper, and how the demo builds it.
``python -m jdoptim --list`` prints this table, the demo runs from it, and a test checks it
against :mod:`jdoptim.aggregation` (every aggregator listed, every "needs" true to the class).

To add a method, add one :class:`MethodEntry` to :data:`METHODS`. Importing this module does not
import the methods: :attr:`MethodEntry.build` imports them when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aggregation import Aggregator

__all__ = ["METHODS", "MethodEntry", "by_name", "format_catalog"]


@dataclass(frozen=True)
class MethodEntry:
    """One aggregation method.

    Attributes:
        name: the class name in :mod:`jdoptim.aggregation`.
        needs: ``"Gramian"`` (weights from ``G = J Jᵀ``: the engine's ``modules=`` path never
            forms ``J``) or ``"Jacobian"`` (the full ``J``).
        stateful: ``"no"``, or ``"yes (what)"``: state kept in ``state_dict()``, ``reset()``.
        non_conflicting: when ``J d ≥ 0`` holds (``"yes"``, ``"no"``, or the condition).
        summary: what the method does, in one line.
        paper: the authors, year and short title.
        demo_arguments: the keyword arguments the demo builds it with.
        min_losses: the fewest losses the method accepts with the demo's arguments.
    """

    name: str
    needs: str
    stateful: str
    non_conflicting: str
    summary: str
    paper: str
    demo_arguments: dict[str, object] = field(default_factory=dict)
    min_losses: int = 1

    def arguments_text(self) -> str:
        """The demo's arguments as written in a call, e.g. ``c=0.4``."""
        if self.name == "Constant":
            return "weights=torch.full((m,), 1 / m)"
        return ", ".join(f"{key}={value!r}" for key, value in self.demo_arguments.items())

    def build(self, m: int) -> Aggregator:
        """A fresh instance with the demo's arguments, for ``m`` losses (stateful methods must
        not be shared between runs)."""
        from . import aggregation

        if m < self.min_losses:
            raise ValueError(
                f"{self.name}({self.arguments_text()}) needs at least {self.min_losses} losses, "
                f"got {m}."
            )
        if self.name == "Constant":
            import torch

            return aggregation.Constant(torch.full((m,), 1.0 / m))
        return getattr(aggregation, self.name)(**self.demo_arguments)


METHODS: tuple[MethodEntry, ...] = (
    MethodEntry(
        "UPGrad", "Gramian", "no", "yes",
        "mean of the gradients each projected onto the cone of non-conflicting directions",
        "Quinton & Rey 2024, Jacobian Descent for Multi-Objective Optimization",
    ),
    MethodEntry(
        "DualProj", "Gramian", "no", "yes",
        "the mean gradient projected onto the cone of non-conflicting directions",
        "Quinton & Rey 2024",
    ),
    MethodEntry(
        "MGDA", "Gramian", "no", "yes",
        "minimum-norm point of the convex hull of the gradients",
        "Désidéri 2012; Sener & Koltun 2018, Multi-Task Learning as Multi-Objective Optimization",
    ),
    MethodEntry(
        "CAGrad", "Gramian", "no", "no",
        "best worst-case improvement within a ball around the mean gradient",
        "Liu et al. 2021, Conflict-Averse Gradient Descent", {"c": 0.4},
    ),
    MethodEntry(
        "NashMTL", "Gramian", "yes (cached weights)", "independent rows",
        "Nash bargaining solution between the tasks: g_i . d = 1 / w_i",
        "Navon et al. 2022, Multi-Task Learning as a Bargaining Game",
    ),
    MethodEntry(
        "IMTLG", "Gramian", "no", "no",
        "update with equal projections on every unit gradient",
        "Liu et al. 2021, Towards Impartial Multi-task Learning",
    ),
    MethodEntry(
        "AlignedMTL", "Gramian", "no", "no",
        "gradients replaced by the nearest orthogonal system of equal norms",
        "Senushkin et al. 2023, Independent Component Alignment for MTL",
    ),
    MethodEntry(
        "FairGrad", "Gramian", "no", "independent rows",
        "alpha-fair allocation of the improvements: G w = w^(-1/alpha)",
        "Ban & Ji 2024, Fair Resource Allocation in Multi-Task Learning",
    ),
    MethodEntry(
        "ConFIG", "Gramian", "no", "independent rows",
        "direction with equal cosines to all gradients, scaled by their projections",
        "Liu, Chu & Thuerey 2024, ConFIG",
    ),
    MethodEntry(
        "PCGrad", "Gramian", "yes (random order)", "m = 2",
        "each gradient stripped of its components against the others, then summed",
        "Yu et al. 2020, Gradient Surgery for Multi-Task Learning", {"seed": 0},
    ),
    MethodEntry(
        "GradVac", "Gramian", "yes (EMA)", "no",
        "pairs of gradients pulled towards an EMA of their cosine similarity",
        "Wang et al. 2021, Gradient Vaccine", {"seed": 0},
    ),
    MethodEntry(
        "GradDrop", "Jacobian", "yes (generator)", "no",
        "per coordinate, keep the positive or the negative gradient entries at random",
        "Chen et al. 2020, Just Pick a Sign", {"seed": 0},
    ),
    MethodEntry(
        "ExcessMTL", "Jacobian", "yes (gradient sums)", "no",
        "losses weighted by their estimated excess risk (AdaGrad-style)",
        "He et al. 2024, Robust Multi-Task Learning with Excess Risks",
    ),
    MethodEntry(
        "Random", "Gramian", "yes (generator)", "no",
        "random weights, softmax of a normal draw, at every step",
        "Lin et al. 2022, Reasonable Effectiveness of Random Weighting", {"seed": 0},
    ),
    MethodEntry(
        "Krum", "Gramian", "no", "no",
        "the gradient closest to its nearest neighbours (Byzantine-robust)",
        "Blanchard et al. 2017, Byzantine Tolerant Gradient Descent", {"n_byzantine": 0},
        min_losses=3,
    ),
    MethodEntry(
        "TrimmedMean", "Jacobian", "no", "no",
        "per coordinate, the mean after dropping the largest and smallest entries",
        "Yin et al. 2018, Byzantine-Robust Distributed Learning", {"trim_number": 1},
        min_losses=3,
    ),
    MethodEntry(
        "Mean", "Gramian", "no", "no",
        "the mean gradient (plain descent on the mean loss)",
        "plain scalarisation",
    ),
    MethodEntry(
        "Sum", "Gramian", "no", "no",
        "the summed gradient (plain descent on the summed loss)",
        "plain scalarisation",
    ),
    MethodEntry(
        "Constant", "Gramian", "no", "no",
        "fixed user-given weights (plain descent on a weighted sum)",
        "plain scalarisation", min_losses=1,
    ),
)  # fmt: skip
"""Every method, in the order of the documentation's table."""


def by_name(name: str) -> MethodEntry:
    """The entry of ``name`` (exact spelling); raises ``KeyError`` naming the known ones."""
    for entry in METHODS:
        if entry.name == name:
            return entry
    raise KeyError(f"No method {name!r}; known: {', '.join(e.name for e in METHODS)}.")


def format_catalog(entries: tuple[MethodEntry, ...] = METHODS) -> str:
    """One line per method: name, needs, stateful, one-line summary, paper."""
    width = max(len(entry.name) for entry in entries)
    lines = []
    for entry in entries:
        state = "stateful" if entry.stateful != "no" else "stateless"
        lines.append(
            f"{entry.name:<{width}}  {entry.needs:<8}  {state:<9}  {entry.summary}  "
            f"[{entry.paper}]"
        )
    return "\n".join(lines)
