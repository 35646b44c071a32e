r"""Every method on the demo's multi-task problem, over several seeds: a table and a plot.

For each seed ``s`` the demo's :class:`~jdoptim.demo.multitask.MultiTaskProblem` (three
regression tasks ``A``, ``B``, ``C`` on a shared trunk, ``C`` warm-started and on a smaller scale)
is trained from its common start by every method in lockstep (step ``k`` of every method, then
step ``k + 1``), with the demo's loop: Adam (lr 5e-3, linear warm-up over the first quarter)
wrapped in ``JDOptimizer(adam, method)``; the baseline ``Sum`` is the plain
``sum(losses).backward(); adam.step()``. Per method and seed it records

* ``r_t = L_t(final) / L_t(start)`` for each task ``t`` (below 1: the task improved),
* whether any task ended worse than it started (``r_t > 1``),
* the median over steps of ``time(step) / time(plain step of the same round)``.

Over the seeds it reports the median of each ``r_t``, the number of seeds in which each task got
worse, the median of the worst task's ``max_t r_t``, and the median time ratio. The scalarizers
(``jdoptim.scalarization``) run through the same ``JDOptimizer(adam, scalarizer)`` call. MoDo and
SDMGrad are skipped: a step needs two or three independent batches of the same losses
(``extra_batches=``), and this problem is full-batch.

Run from the repository root (about 4-5 minutes on 2 CPU cores with the defaults)::

    PYTHONPATH=$PWD python -m benchmarks.compare_methods --plot docs/comparison.png \\
        --json /tmp/comparison.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from jdoptim import catalog
from jdoptim.demo.methods import BASELINE
from jdoptim.demo.multitask import TASKS, MultiTaskProblem, MultiTaskResult, train_interleaved

SKIPPED: dict[str, str] = {
    "MoDo": "needs two independent batches per step (extra_batches=); the problem is full-batch",
    "SDMGrad": "needs three independent batches per step (extra_batches=); the problem is "
    "full-batch",
}


def all_methods() -> tuple[str, ...]:
    """The plain step, then every catalogue method but the skipped ones (aggregation ``Sum`` is
    the plain step itself; ``scalarization.Sum`` is kept: the same update through JDOptimizer)."""
    labels = (
        entry.label
        for entry in catalog.METHODS
        if entry.name not in SKIPPED and entry.label != BASELINE
    )
    return (BASELINE, *labels)


def run_seed(
    seed: int, methods: Sequence[str], steps: int, lr: float = 5e-3
) -> list[MultiTaskResult]:
    """Every method on seed ``seed``'s problem, in lockstep, with interleaved time ratios."""
    if methods[0] != BASELINE:
        raise ValueError(f"The first method must be the plain step {BASELINE!r}, got {methods}.")
    return train_interleaved(MultiTaskProblem(seed=seed), methods, steps, lr)


@dataclass
class Row:
    """One method over the seeds."""

    method: str
    relative: list[float]  # per task: median over seeds of final / start
    worse_seeds: list[int]  # per task: seeds where final > start
    any_worse_seeds: int  # seeds where at least one task ended above its start
    worst_relative: float  # median over seeds of max_t final_t / start_t
    time_ratio: float  # median over seeds of the per-seed median time ratio


def aggregate(per_seed: Sequence[Sequence[MultiTaskResult]]) -> list[Row]:
    """One row per method (``per_seed[s][i]``: method ``i`` on seed ``s``), sorted by the seeds
    with a task made worse, then by the worst task's final/start (the time is a column apart)."""
    rows = []
    for i, first in enumerate(per_seed[0]):
        results = [seed_results[i] for seed_results in per_seed]
        ratios = [r.time_ratio for r in results]
        if None in ratios or any(r.method != first.method for r in results):
            raise ValueError(f"{first.method}: every seed needs the same methods, timed.")
        relative = torch.stack([r.final / r.initial for r in results])  # [seeds, tasks]
        rows.append(
            Row(
                method=first.method,
                relative=[statistics.median(column.tolist()) for column in relative.T],
                worse_seeds=[int(n) for n in (relative > 1).sum(dim=0)],
                any_worse_seeds=int((relative > 1).any(dim=1).sum()),
                worst_relative=statistics.median(relative.max(dim=1).values.tolist()),
                time_ratio=statistics.median(ratios),  # type: ignore[arg-type]
            )
        )
    return sort_rows(rows)


def sort_rows(rows: Sequence[Row]) -> list[Row]:
    """By the seeds with a task made worse, then by the worst task's final/start."""
    return sorted(rows, key=lambda row: (row.any_worse_seeds, row.worst_relative))


def _kind(method: str) -> str:
    if method == BASELINE:
        return "plain step"
    return "scalarizer" if method.startswith("scalarization.") else "aggregator"


def markdown_table(rows: Sequence[Row], seeds: int) -> str:
    """The table: final/start per task (median), seeds with each task worse, time ratio."""
    tasks = " | ".join(f"{t} final/start" for t in TASKS)
    header = (
        f"| method | kind | {tasks} | worst task final/start | seeds with a task worse "
        f"(of {seeds}) | seeds worse per task ({'/'.join(TASKS)}) | time / plain step |"
    )
    lines = [header, "|" + "---|" * (len(TASKS) + 6)]
    for row in rows:
        cells = [
            f"`{row.method}`",
            _kind(row.method),
            *(f"{value:.3g}" for value in row.relative),
            f"{row.worst_relative:.3g}",
            str(row.any_worse_seeds),
            "/".join(str(n) for n in row.worse_seeds),
            f"{row.time_ratio:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _label(row: Row, seeds: int) -> str:
    name = row.method.removeprefix("scalarization.")
    name += " (scal.)" if name != row.method else ""
    return f"{name}  [{row.any_worse_seeds}/{seeds}]"


def plot(rows: Sequence[Row], path: str | Path, seeds: int, steps: int) -> None:
    """Two panels, one line per method (same order as the table): left, each task's median
    final/start on a log axis, shaded where a task ended worse than it started (> 1); right, the
    median time per step relative to the plain step."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    y = list(range(len(rows)))[::-1]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(11, 0.28 * len(rows) + 2.4), sharey=True,
        gridspec_kw={"width_ratios": [2, 1]},
    )  # fmt: skip
    left.axvspan(1.0, 100.0, color="tab:red", alpha=0.08, label="worse than at the start")
    for t, (task, marker) in enumerate(zip(TASKS, "o^s")):
        left.scatter([row.relative[t] for row in rows], y, marker=marker, label=f"task {task}")
    left.axvline(1.0, color="black", linewidth=1)
    left.set_xscale("log")
    low = 0.8 * min(min(row.relative) for row in rows)
    high = 1.3 * max(max(max(row.relative) for row in rows), 1.0)
    left.set_xlim(low, high)
    left.set_xticks([v for v in (1e-4, 1e-3, 0.01, 0.1, 0.3, 1, 3, 10, 30) if low < v < high])
    left.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_xlabel("final loss / loss at the start, per task (median over seeds)")
    left.set_yticks(y, [_label(row, seeds) for row in rows], fontsize=8)
    left.legend(loc="upper right", fontsize=8)
    colours = {"plain step": "grey", "aggregator": "tab:blue", "scalarizer": "tab:orange"}
    right.barh(y, [row.time_ratio for row in rows], color=[colours[_kind(r.method)] for r in rows])
    right.axvline(1.0, color="black", linewidth=1)
    right.set_xlabel("time per step / plain summed-loss step\n(median, timed interleaved)")
    for axis in (left, right):
        axis.grid(axis="x", alpha=0.3)
        axis.set_ylim(-0.7, len(rows) - 0.3)
    fig.suptitle(
        f"Every method on the demo's 3-task problem: {seeds} seeds (0-{seeds - 1}), {steps} Adam "
        "steps each. [k/N]: seeds where a task ended worse than it started.\n"
        "Sorted by that count, then by the worst task's final/start. Bars: grey the plain step, "
        "blue aggregators (Jacobian descent), orange scalarizers (one backward).",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default 5)")
    parser.add_argument("--steps", type=int, default=400, help="steps per run (default 400)")
    parser.add_argument("--methods", default="all", help="comma-separated labels, or 'all'")
    parser.add_argument("--plot", default=None, help="write the PNG here (needs matplotlib)")
    parser.add_argument("--json", default=None, help="write the rows here as JSON")
    parser.add_argument("--from-json", default=None, help="table and plot from saved rows")
    return parser.parse_args(argv)


def _measure(args: argparse.Namespace) -> list[Row]:
    methods = all_methods() if args.methods == "all" else (BASELINE, *args.methods.split(","))
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(run_seed(seed, methods, args.steps))
        print(f"seed {seed} done", file=sys.stderr, flush=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{datetime.date.today()}, {args.seeds} seeds x {args.steps} steps, "
        f"{len(methods)} methods; skipped: {', '.join(SKIPPED)}\n"
    )
    return aggregate(per_seed)


def main(argv: Sequence[str] | None = None) -> str:
    """Run, print the conditions and the markdown table, write the plot; returns the table."""
    args = _arguments(argv)
    if args.from_json:
        rows = sort_rows([Row(**row) for row in json.loads(Path(args.from_json).read_text())])
    else:
        rows = _measure(args)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(row) for row in rows], indent=1))
    table = markdown_table(rows, args.seeds)
    print(table)
    if args.plot:
        plot(rows, args.plot, args.seeds, args.steps)
    return table


if __name__ == "__main__":
    main()
