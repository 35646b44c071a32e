"""The catalogue of methods: one entry per method, in one place.

Each :class:`MethodEntry` says what the method needs from a step (the Gramian ``G = J Jᵀ`` only,
the full Jacobian ``J``, also the loss values, the product ``J₁J₂ᵀ`` of two batches' Jacobians,
or, for the loss-only methods of :mod:`jdoptim.scalarization`, the loss values alone), whether it
keeps state between steps, whether its update provably conflicts with no loss's gradient, what it
does in one line, its paper, and how the demo builds it. ``python -m jdoptim --list`` prints this
table, the demo runs from it (the one-batch aggregation methods), and a test checks it against
:mod:`jdoptim.aggregation` and :mod:`jdoptim.scalarization` (every method listed, every "needs"
and "stateful" true to the class).

To add a method, add one :class:`MethodEntry` to :data:`METHODS`. Importing this module does not
import the methods: :attr:`MethodEntry.build` imports them when called.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aggregation import Aggregator
    from .scalarization import Scalarizer

__all__ = ["METHODS", "MethodEntry", "by_name", "format_catalog"]


@dataclass(frozen=True)
class MethodEntry:
    """One aggregation method.

    Attributes:
        name: the class name in :mod:`jdoptim.aggregation` (or :mod:`jdoptim.scalarization`).
        needs: ``"Gramian"`` (weights from ``G = J Jᵀ``: the engine's ``modules=`` path never
            forms ``J``), ``"Jacobian"`` (the full ``J``), either ``+ losses`` (the loss values
            too), ``"J1 J2^T"`` (two or three batches, ``extra_batches=``) or ``"losses"`` (a
            scalarizer: one backward, no Jacobian).
        stateful: ``"no"``, or ``"yes (what)"``: state kept in ``state_dict()``, ``reset()``.
        non_conflicting: when ``J d ≥ 0`` holds (``"yes"``, ``"no"``, or the condition).
        summary: what the method does, in one line.
        paper: the authors, year and short title.
        demo_arguments: the keyword arguments the demo builds it with.
        min_losses: the fewest losses the method accepts with the demo's arguments.
        module: ``"aggregation"`` or ``"scalarization"``.
        in_demo: whether the demo runs it (not the cross-batch methods, which need several
            batches per step, nor the scalarizers).
    """

    name: str
    needs: str
    stateful: str
    non_conflicting: str
    summary: str
    paper: str
    demo_arguments: dict[str, object] = field(default_factory=dict)
    min_losses: int = 1
    module: str = "aggregation"
    in_demo: bool = True

    @property
    def label(self) -> str:
        """The name as listed: ``UPGrad``, or ``scalarization.UW`` for a scalarizer (``Sum``,
        ``Mean``, ``Constant`` and ``Random`` exist in both modules)."""
        return self.name if self.module == "aggregation" else f"{self.module}.{self.name}"

    def arguments_text(self) -> str:
        """The demo's arguments as written in a call, e.g. ``c=0.4``."""
        if self.name in _WEIGHTS_FIRST or self.name in _SHAPE_FIRST:
            return _ARGUMENTS_TEXT[self.name]
        if self.name == "CRMOGMWeighting":
            return "UPGradWeighting()"
        return ", ".join(f"{key}={value!r}" for key, value in self.demo_arguments.items())

    def build(self, m: int) -> Aggregator | Scalarizer:
        """A fresh instance with the demo's arguments, for ``m`` losses (stateful methods must
        not be shared between runs)."""
        import torch

        from . import aggregation, scalarization

        if m < self.min_losses:
            raise ValueError(
                f"{self.name}({self.arguments_text()}) needs at least {self.min_losses} losses, "
                f"got {m}."
            )
        module = aggregation if self.module == "aggregation" else scalarization
        cls = getattr(module, self.name)
        if self.name == "CRMOGMWeighting":  # a weighting around another one
            weighting = cls(aggregation.UPGradWeighting())
            return aggregation.GramianWeightedAggregator(weighting)
        if self.name in _WEIGHTS_FIRST:  # a constant or preference vector of m weights
            return cls(*_WEIGHTS_FIRST[self.name], torch.full((m,), 1.0 / m))
        if self.name in _SHAPE_FIRST:  # methods built for m losses
            return cls(m, **self.demo_arguments)
        return cls(**self.demo_arguments)


#: Methods whose constructor takes the weights (after the listed arguments).
_WEIGHTS_FIRST: dict[str, tuple[object, ...]] = {
    "Constant": (), "COSMOS": (0.5,), "PBI": (3.0,), "STCH": (0.5,),
}  # fmt: skip
#: Methods whose constructor takes the number of losses.
_SHAPE_FIRST = frozenset({"UW", "IMTLL", "FAMO"})
_ARGUMENTS_TEXT = {
    "Constant": "weights=torch.full((m,), 1 / m)",
    "COSMOS": "0.5, torch.full((m,), 1 / m)",
    "PBI": "3.0, torch.full((m,), 1 / m)",
    "STCH": "0.5, torch.full((m,), 1 / m)",
    "UW": "m",
    "IMTLL": "m",
    "FAMO": "m",
}


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
    # -- issue 17: more weightings and LibMTL's gradient methods (jdoptim.aggregation) --
    MethodEntry(
        "PCD", "Gramian", "yes (EMA of squared norms)", "no",
        "follow the first (primary) gradient, each other loss kept to a share of its progress",
        "Not All Objectives Are Born Equal: Priority-Constrained Descent, TMLR 2026",
    ),
    MethodEntry(
        "CRMOGMWeighting", "Gramian", "yes (previous weights)", "no",
        "another weighting's weights smoothed by an exponential moving average",
        "Zhou et al. 2022, On the Convergence of Stochastic Multi-Objective Gradient "
        "Manipulation and Beyond",
    ),
    MethodEntry(
        "MoDo", "J1 J2^T", "yes (weights)", "no",
        "weights by a projected step on J1 J2^T of two independent batches (double sampling)",
        "Chen et al. 2024, Three-Way Trade-Off in Multi-Objective Learning",
        in_demo=False,
    ),
    MethodEntry(
        "SDMGrad", "J1 J2^T", "yes (weights)", "no",
        "direction-oriented weights, regularised towards a preference, from J1 J2^T",
        "Xiao et al. 2023, Direction-oriented Multi-objective Learning",
        in_demo=False,
    ),
    MethodEntry(
        "GradNorm", "Gramian + losses", "yes (learned weights, initial losses)", "no",
        "learned weights that equalise the gradient norms, scaled by each loss's training rate",
        "Chen et al. 2018, GradNorm",
    ),
    MethodEntry(
        "IMTL", "Gramian + losses", "yes (log-scales)", "no",
        "IMTL-L's learned loss scales, then IMTL-G's equal projections on the scaled gradients",
        "Liu et al. 2021, Towards Impartial Multi-task Learning",
    ),
    MethodEntry(
        "DBMTL", "Jacobian + losses", "yes (EMA of gradients)", "no",
        "gradients of the log-losses, averaged, rescaled to the largest norm, summed",
        "Lin et al. 2023, Dual-Balancing for Multi-Task Learning",
    ),
    MethodEntry(
        "MoCo", "Jacobian + losses", "yes (tracked gradients, weights)", "no",
        "tracked gradients corrected towards the new ones, MGDA-like weights by a softmax step",
        "Fernando et al. 2023, Mitigating Gradient Bias in Multi-objective Learning",
    ),
    # -- loss-only methods (jdoptim.scalarization): one backward of the scalarized loss --
    *(
        MethodEntry(*fields, module="scalarization", in_demo=False)
        for fields in (
            ("Sum", "losses", "no", "no", "the sum of the losses", "plain scalarisation"),
            ("Mean", "losses", "no", "no", "the mean of the losses", "plain scalarisation"),
            ("Constant", "losses", "no", "no", "a fixed weighted sum of the losses",
             "plain scalarisation"),
            ("GeometricMean", "losses", "no", "no",
             "the geometric mean of the losses (weights s / (m l_i))",
             "Chennupati et al. 2019, MultiNet++"),
            ("COSMOS", "losses", "no", "no",
             "a weighted sum minus a reward for pointing the losses along a preference",
             "Ruchte & Grabocka 2021, Scalable Pareto Front Approximation"),
            ("PBI", "losses", "no", "no",
             "distance along a preference direction plus a penalty for leaving it",
             "Zhang & Li 2007, MOEA/D"),
            ("STCH", "losses", "yes (warm-up minima)", "no",
             "a smooth maximum of the weighted losses above an ideal point",
             "Lin et al. 2024, Smooth Tchebycheff Scalarization"),
            ("Random", "losses", "yes (generator)", "no",
             "random weights, softmax of a normal draw, at every step",
             "Lin et al. 2022, Reasonable Effectiveness of Random Weighting"),
            ("UW", "losses", "yes (learned log-variances)", "no",
             "losses weighted by learned uncertainties, exp(-s_i) l_i / 2 + s_i / 2",
             "Kendall, Gal & Cipolla 2018, Multi-Task Learning Using Uncertainty"),
            ("IMTLL", "losses", "yes (learned log-scales)", "no",
             "losses scaled by learned exp(s_i), minus s_i (IMTL-L)",
             "Liu et al. 2021, Towards Impartial Multi-task Learning"),
            ("DWA", "losses", "yes (epoch averages)", "no",
             "weights from how fast each loss fell over the last two epochs",
             "Liu, Johns & Davison 2019, End-to-End Multi-Task Learning with Attention"),
            ("FAMO", "losses", "yes (logits, Adam state)", "no",
             "weights learned so that every loss decreases at the same relative rate",
             "Liu et al. 2023, FAMO: Fast Adaptive Multitask Optimization"),
        )
    ),
)  # fmt: skip
"""Every method, in the order of the documentation's table."""


def by_name(name: str) -> MethodEntry:
    """The entry of ``name`` (its :attr:`~MethodEntry.label`, exact spelling); raises
    ``KeyError`` naming the known ones."""
    for entry in METHODS:
        if entry.label == name:
            return entry
    raise KeyError(f"No method {name!r}; known: {', '.join(e.label for e in METHODS)}.")


def format_catalog(entries: tuple[MethodEntry, ...] = METHODS) -> str:
    """One line per method: name, needs, stateful, one-line summary, paper."""
    width = max(len(entry.label) for entry in entries)
    needs = max(len(entry.needs) for entry in entries)
    lines = []
    for entry in entries:
        state = "stateful" if entry.stateful != "no" else "stateless"
        lines.append(
            f"{entry.label:<{width}}  {entry.needs:<{needs}}  {state:<9}  {entry.summary}  "
            f"[{entry.paper}]"
        )
    return "\n".join(lines)
