"""``python -m jdoptim`` (or the ``jdoptim`` command): the demonstration's command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TextIO

import torch

from . import methods, multitask, report, toy
from .progress import ProgressBar

__all__ = ["MAX_TOY_STEPS", "SUMMARY_METHODS", "build_parser", "main"]

MAX_TOY_STEPS = 2000
"""By 2000 steps the toy runs have settled (checked for Sum, UPGrad and MGDA from the five
starts): more steps change no row of the table, only the waiting (the 'steps to reach' column
says when each method got there)."""

SUMMARY_METHODS = (methods.BASELINE, "UPGrad")
"""The methods of the over-seeds summary: the README's lesson is about these two."""

_INTRO = """\
jdoptim demo: Jacobian descent (JD) against the summed loss, on built-in data.
With several losses, sum(losses).backward() lets one loss go up while the sum goes down;
JDOptimizer(Adam, aggregator) takes one gradient per loss and combines them (the aggregator)
into an update that, with UPGrad, conflicts with none of them."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdoptim",
        description="Compare Jacobian descent with the summed loss on two built-in problems.",
    )
    parser.add_argument(
        "--methods",
        default=",".join(methods.DEFAULT_METHODS),
        help="comma-separated methods, or 'all' ('Sum' is the plain summed-loss step; always "
        "included); --list describes them. Default: %(default)s.",
    )
    parser.add_argument("--steps", type=int, default=400, help="multi-task steps (default 400)")
    parser.add_argument(
        "--toy-steps",
        type=int,
        default=500,
        help=f"toy-problem steps per start (default 500, at most {MAX_TOY_STEPS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the multi-task problem")
    parser.add_argument(
        "--seeds",
        type=int,
        default=10,
        help="multi-task summary over seeds 0..N-1 for Sum and UPGrad (default 10; 0 skips it)",
    )
    parser.add_argument(
        "--only", choices=("multitask", "toy"), help="run one of the two experiments only"
    )
    parser.add_argument(
        "--plots",
        metavar="DIR",
        type=Path,
        help="write PNG plots (loss curves, toy trajectories) into DIR; needs matplotlib",
    )
    parser.add_argument("--list", action="store_true", help="describe the known methods and exit")
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run the demo; returns the process exit status."""
    out = sys.stdout if stream is None else stream
    args = build_parser().parse_args(argv)
    if args.list:
        print(methods.describe(), file=out)
        return 0
    chosen, problem = _check_arguments(args)
    if problem is not None:
        print(f"jdoptim: error: {problem}", file=sys.stderr)
        return 2

    # The demo's tensors are tiny: one thread is fastest, and steadier on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    begin = time.perf_counter()
    print(_INTRO, file=out)
    task_results: list[multitask.MultiTaskResult] = []
    toy_results: list[toy.ToyResult] = []
    try:
        if args.only in (None, "multitask"):
            task_results = _run_multitask(chosen, args.steps, args.seed, out)
            if args.seeds > 0:
                _run_seeds(args.seeds, args.steps, args.seed, task_results, out)
        if args.only in (None, "toy"):
            toy_results = _run_toy(chosen, args.toy_steps, out)
    finally:
        torch.set_num_threads(threads)
    if args.plots is not None:
        _write_plots(args.plots, task_results, toy_results, args.seed, out)
    print(f"\nDone in {time.perf_counter() - begin:.0f} s.", file=out)
    return 0


def _check_arguments(args: argparse.Namespace) -> tuple[tuple[str, ...], str | None]:
    """The chosen methods (the baseline first), and what is wrong with the arguments, if
    anything: checked before any training, so that a bad argument costs no waiting."""
    try:
        chosen = methods.resolve([m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as error:
        return (), str(error)
    chosen = methods.resolve([methods.BASELINE, *chosen])
    if args.steps < 1 or args.toy_steps < 1:
        return chosen, "--steps and --toy-steps must be positive."
    if args.toy_steps > MAX_TOY_STEPS:
        return chosen, (
            f"--toy-steps {args.toy_steps}: at most {MAX_TOY_STEPS}. By then the runs have "
            "settled (the summed loss at the middle of the Pareto set, JD where it first "
            "reached it): more steps change nothing but the wait."
        )
    if args.seeds < 0:
        return chosen, "--seeds must be 0 (no summary) or positive."
    if args.plots is not None:
        return chosen, _plots_problem(args.plots)
    return chosen, None


def _plots_problem(directory: Path) -> str | None:
    """Why PNG files cannot be written into ``directory`` (``None`` if they can): matplotlib
    missing, a file in the way, or no permission. The directory is created if needed."""
    from .plots import matplotlib_available

    if not matplotlib_available():
        return '--plots needs matplotlib: pip install "jdoptim[plot]".'
    blocking = next((p for p in (directory, *directory.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return f"--plots {directory}: {blocking} is a file, not a directory; choose a directory."
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        return f"--plots {directory}: cannot write there ({reason}); choose another directory."
    return None


def _run_multitask(
    chosen: Sequence[str], steps: int, seed: int, out: TextIO
) -> list[multitask.MultiTaskResult]:
    print(
        "\n1. Multi-task regression: three tasks share a trunk with a 3-unit bottleneck; task C\n"
        "   was learned first and its loss is on a 10x smaller scale. Adam, full batch, "
        f"{steps} steps, seed {seed}.",
        file=out,
    )
    problem = multitask.MultiTaskProblem(seed=seed)
    with ProgressBar(len(chosen) * steps, "multi-task training") as bar:
        results = multitask.train_interleaved(
            problem, chosen, steps, on_step=lambda m: bar.update(1, m)
        )
    print(report.multitask_table(results), file=out)
    print(
        "   'got worse': final loss above the starting loss. 'conflicts': JD steps where the\n"
        "   gradients of two tasks pointed against each other (g_i . g_j < 0, read off the step's\n"
        "   Gramian). 'time/step': a step's wall time over the plain step's; the methods take\n"
        "   their steps in turn (step k of each, then step k+1) and this is the median over the\n"
        "   steps of the ratio within each turn, so that load from other programs cancels out.",
        file=out,
    )
    print(_multitask_reading(results), file=out)
    return results


def _multitask_reading(results: Sequence[multitask.MultiTaskResult]) -> str:
    """What to read in the table: which methods sacrificed a task, and the trade-off."""
    worse = [f"{r.method} ({', '.join(r.worsened)})" for r in results if r.worsened]
    kept = [r.method for r in results if not r.worsened]
    lines = [
        "   Made a task worse: " + (", ".join(worse) or "none") + ".",
        "   Made no task worse: " + (", ".join(kept) or "none") + ".",
        "   No row need be best on every task: with a 3-unit bottleneck the tasks compete for\n"
        "   the trunk, and each method settles on its own trade-off; the summed loss gives up\n"
        "   C for A and B. One seed can mislead (a method slow on one task here may not be on\n"
        "   another seed): the summary below repeats Sum and UPGrad over several seeds.",
    ]
    return "\n".join(lines)


def _run_seeds(
    count: int,
    steps: int,
    seed: int,
    done: Sequence[multitask.MultiTaskResult],
    out: TextIO,
) -> None:
    print(
        f"\n   Over seeds 0-{count - 1} ({', '.join(SUMMARY_METHODS)}; --seeds N to change, "
        "0 to skip):",
        file=out,
    )
    runs: dict[str, list[multitask.MultiTaskResult]] = {m: [] for m in SUMMARY_METHODS}
    todo = [(s, m) for s in range(count) for m in SUMMARY_METHODS]
    reuse = {r.method: r for r in done} if seed < count else {}
    with ProgressBar(len(todo) * steps, "the same over seeds") as bar:
        for each_seed, method in todo:
            if each_seed == seed and method in reuse:
                runs[method].append(reuse[method])
                bar.update(steps, method)
                continue
            problem = multitask.MultiTaskProblem(seed=each_seed)
            runs[method].append(
                multitask.train(problem, method, steps, on_step=partial(bar.update, 1, method))
            )
    print(report.seeds_table(runs), file=out)
    print(
        "   'final/start': a task's final loss over its starting loss (below 1: improved), the\n"
        "   median over the seeds.\n" + _seeds_reading(runs),
        file=out,
    )


def _seeds_reading(runs: dict[str, list[multitask.MultiTaskResult]]) -> str:
    """UPGrad's median final losses against the summed loss's, task by task."""

    def medians(method: str) -> torch.Tensor:
        return torch.stack([r.final for r in runs[method]]).median(dim=0).values

    ratio = (medians("UPGrad") / medians(methods.BASELINE)).tolist()
    cells = ", ".join(f"{t} ×{v:.2g}" for t, v in zip(multitask.TASKS, ratio))
    return f"   UPGrad's median final loss over the summed loss's, task by task: {cells}."


def _run_toy(chosen: Sequence[str], steps: int, out: TextIO) -> list[toy.ToyResult]:
    runnable = [m for m in chosen if methods.runs_on_toy(m)]
    print(
        "\n2. The two-objective toy problem of CAGrad (Liu et al., 2021) and Nash-MTL (Navon et "
        "al., 2022):\n   from five starting points, does Adam reach the Pareto set "
        f"(x2 = {toy.PARETO_X2}, |x1| <= 7) within {steps} steps, and where?",
        file=out,
    )
    few = [m for m in chosen if m not in runnable and methods.min_losses(m) > 2]
    if few:
        print(f"   ({', '.join(few)}: need 3 or more losses; not run here.)", file=out)
    positive = [m for m in chosen if m not in runnable and m not in few]
    if positive:
        print(
            f"   ({', '.join(positive)}: use the loss values, which must be positive; the toy's "
            "are zero or negative in places, so not run here.)",
            file=out,
        )
    results = []
    with ProgressBar(len(runnable) * len(toy.STARTS) * steps, "toy problem") as bar:
        for method in runnable:
            results.append(
                toy.optimise(method, steps=steps, on_step=partial(bar.update, 1, method))
            )
    print(report.toy_table(results), file=out)
    print(
        "   (x1, x2): where each run ended; ✓ within 0.3 of the Pareto set. 'steps to reach':\n"
        "   the median over the five starts of the first step within 0.3 (a start that never\n"
        "   got there counts as later than any).\n"
        "   The summed loss has one minimiser on the set, its middle x1 = 0: given steps enough,\n"
        "   it slides there from every start, through the flat valley above. A non-conflicting\n"
        "   JD method stops at the first Pareto-optimal point it reaches, so where it ends\n"
        "   depends on the start (a different trade-off between f1 and f2), and it gets there\n"
        "   sooner.",
        file=out,
    )
    return results


def _write_plots(
    directory: Path,
    task_results: Sequence[multitask.MultiTaskResult],
    toy_results: Sequence[toy.ToyResult],
    seed: int,
    out: TextIO,
) -> None:
    from .plots import plot_multitask, plot_toy

    written = []
    if task_results:
        path = directory / "multitask_losses.png"
        written.append(plot_multitask(task_results, path, seed))
    if toy_results:
        written.append(plot_toy(toy_results, directory / "toy_trajectories.png"))
    for path in written:
        print(f"Wrote {path}", file=out)
