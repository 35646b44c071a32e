r"""A multi-task regression problem whose tasks genuinely conflict.

Three regression tasks share a small trunk with a 3-unit bottleneck; each task has its own linear
head. Task ``C`` was learned first (a short warm start on ``C`` alone) and its loss is on a
smaller scale (its targets are 0.3× as large), as happens when tasks are measured in different
units. Then all three are trained together:

* with the summed loss, Adam follows the large tasks ``A`` and ``B``; their gradients conflict
  with ``C``'s in the trunk, and ``C`` ends worse than where it started;
* with :class:`~jdoptim.JDOptimizer` and UPGrad, the update never conflicts with any task's
  gradient, so ``C`` keeps what it learned while ``A`` and ``B`` are learned.

Everything is seeded: the data, the initial model and the warm start are the same for all
methods, so their final losses are comparable. The data is built in (no download).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..optimizer import JDOptimizer
from .methods import BASELINE, make_aggregator

__all__ = ["TASKS", "MultiTaskProblem", "MultiTaskResult", "train", "train_interleaved"]

TASKS = ("A", "B", "C")
_TARGET_SCALES = (1.0, 1.0, 0.3)


class SharedTrunkModel(nn.Module):
    """A shared trunk with a narrow bottleneck, and one linear head per task."""

    def __init__(self, inputs: int = 8, hidden: int = 32, bottleneck: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, bottleneck), nn.Tanh()
        )
        self.heads = nn.ModuleList(nn.Linear(bottleneck, 1) for _ in TASKS)

    def forward(self, x: Tensor) -> Tensor:
        features = self.trunk(x)
        return torch.cat([head(features) for head in self.heads], dim=1)


@dataclass
class MultiTaskProblem:
    """The data and the common starting point of every run.

    Args:
        seed: seeds the data, the initial model and the warm start.
        samples: number of training samples (full-batch training).
        warm_start_steps: Adam steps on task ``C`` alone before the comparison starts.
    """

    seed: int = 0
    samples: int = 512
    warm_start_steps: int = 15
    inputs: Tensor = field(init=False, repr=False)
    targets: Tensor = field(init=False, repr=False)
    initial_state: dict[str, Tensor] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seed)
        dim = 8
        self.inputs = torch.randn(self.samples, dim, generator=generator)
        directions = torch.randn(len(TASKS), dim, generator=generator)
        self.targets = torch.stack(
            [
                2 * scale * torch.tanh(self.inputs @ a)
                for scale, a in zip(_TARGET_SCALES, directions)
            ],
            dim=1,
        )
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            model = SharedTrunkModel(inputs=dim)
        warm = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(self.warm_start_steps):
            warm.zero_grad()
            self.losses(model)["C"].backward()
            warm.step()
        self.initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def model(self) -> SharedTrunkModel:
        """A fresh model at the common starting point."""
        model = SharedTrunkModel(inputs=self.inputs.shape[1])
        model.load_state_dict(self.initial_state)
        return model

    def losses(self, model: nn.Module) -> dict[str, Tensor]:
        """The per-task mean squared errors, by task name."""
        outputs = model(self.inputs)
        return {
            name: (outputs[:, i] - self.targets[:, i]).pow(2).mean() for i, name in enumerate(TASKS)
        }


@dataclass
class MultiTaskResult:
    """One method's run: per-task losses before, during and after training, and step timing."""

    method: str
    initial: Tensor  # [tasks]
    final: Tensor  # [tasks]
    curve: Tensor  # [steps, tasks], the losses seen at each step
    seconds_per_step: float  # median wall time of one step
    conflicted_steps: int | None = None  # JD runs: steps where two task gradients conflicted
    time_ratio: float | None = None  # interleaved runs: median of (this step / the plain step)

    @property
    def worsened(self) -> list[str]:
        """The tasks whose final loss is above their initial loss."""
        return [name for name, a, b in zip(TASKS, self.initial, self.final) if b > a]


def _warmup(steps: int) -> Callable[[int], float]:
    return lambda step: min(1.0, (step + 1) / max(steps, 1))


class _Run:
    """One method's training, advanced one step at a time (so that runs can be interleaved)."""

    def __init__(self, problem: MultiTaskProblem, method: str, steps: int, lr: float) -> None:
        self.problem, self.method = problem, method
        self.model = problem.model()
        self.adam = torch.optim.Adam(self.model.parameters(), lr=lr)
        self.jd = (
            None
            if method == BASELINE
            else JDOptimizer(self.adam, make_aggregator(method, len(TASKS)))
        )
        # After the JDOptimizer: a scalarizer with learnable scales (UW, IMTLL) adds a parameter
        # group to Adam, which a scheduler built before it would not schedule.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.adam, _warmup(steps // 4))
        with torch.no_grad():
            self.initial = torch.stack(list(problem.losses(self.model).values()))
        self.curve: list[Tensor] = []
        self.durations: list[float] = []
        self.conflicted = 0

    def step(self) -> float:
        """One training step; returns its wall time (the conflict count is read outside it)."""
        start = time.perf_counter()
        losses = self.problem.losses(self.model)
        self.adam.zero_grad()
        record = None
        if self.jd is None:
            values = list(losses.values())
            sum(values[1:], values[0]).backward()  # (the order and result of sum(values))
            self.adam.step()
        else:
            record = self.jd.step(losses)
        self.scheduler.step()
        seconds = time.perf_counter() - start
        self.durations.append(seconds)
        if record is not None and record.conflicting_pairs:
            self.conflicted += 1
        self.curve.append(torch.stack([loss.detach() for loss in losses.values()]))
        return seconds

    def result(self, time_ratio: float | None = None) -> MultiTaskResult:
        with torch.no_grad():
            final = torch.stack(list(self.problem.losses(self.model).values()))
        # The median ignores the first steps' one-off costs (allocations, lazy initialisation).
        seconds = statistics.median(self.durations)
        conflicted = None if self.jd is None else self.conflicted
        curve = torch.stack(self.curve)
        return MultiTaskResult(
            self.method, self.initial, final, curve, seconds, conflicted, time_ratio
        )


def train(
    problem: MultiTaskProblem,
    method: str,
    steps: int = 400,
    lr: float = 5e-3,
    on_step: Callable[[], None] | None = None,
) -> MultiTaskResult:
    """Train a fresh model from the common start with ``method`` (``"Sum"`` or an aggregator).

    Both kinds of run use Adam with a linear learning-rate warm-up over the first quarter of the
    steps; the JD runs wrap that same Adam in :class:`~jdoptim.JDOptimizer`, and count the steps
    whose task gradients conflicted (from each step record's Gramian, outside the timing).
    """
    run = _Run(problem, method, steps, lr)
    for _ in range(steps):
        run.step()
        if on_step is not None:
            on_step()
    return run.result()


def train_interleaved(
    problem: MultiTaskProblem,
    methods: Sequence[str],
    steps: int = 400,
    lr: float = 5e-3,
    on_step: Callable[[str], None] | None = None,
) -> list[MultiTaskResult]:
    """Train every method as :func:`train` does, in lockstep: step ``k`` of every method, then
    step ``k + 1``. Each run's trajectory is the one :func:`train` gives (the runs share nothing).

    The time of a step relative to the plain step (``time_ratio``) is the median, over the
    ``steps`` rounds, of this method's step time divided by the plain step's time *in the same
    round*: a burst of load from other processes then slows both sides of a ratio instead of
    one method's whole run. Needs :data:`~jdoptim.demo.methods.BASELINE` among ``methods`` for
    the ratios (otherwise they are ``None``).
    """
    runs = [_Run(problem, method, steps, lr) for method in methods]
    ratios: list[list[float]] = [[] for _ in runs]
    baseline = next((i for i, m in enumerate(methods) if m == BASELINE), None)
    for _ in range(steps):
        times = []
        for run in runs:
            times.append(run.step())
            if on_step is not None:
                on_step(run.method)
        if baseline is not None:
            for ratio, seconds in zip(ratios, times):
                ratio.append(seconds / times[baseline])
    return [
        run.result(statistics.median(ratio) if ratio else None) for run, ratio in zip(runs, ratios)
    ]
