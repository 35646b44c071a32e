"""``python -m jdoptim`` (or the ``jdoptim`` command): the demonstration's command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from . import methods, multitask, report, toy
from .progress import ProgressBar

__all__ = ["build_parser", "main"]

_INTRO = """\
jdoptim demo: Jacobian descent (JD) against the summed loss, on built-in data.
With several losses, sum(losses).backward() lets one loss go up while the sum goes down;
JDOptimizer(Adam, aggregator) aggregates one gradient per loss instead."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jdoptim",
        description="Compare Jacobian descent with the summed loss on two built-in problems.",
    )
    parser.add_argument(
        "--methods",
        default=",".join(methods.DEFAULT_METHODS),
        help="comma-separated methods, or 'all' ('Sum' is the plain summed-loss step; always "
        "included). "
        f"Known: {', '.join(methods.available())}. Default: %(default)s.",
    )
    parser.add_argument("--steps", type=int, default=400, help="multi-task steps (default 400)")
    parser.add_argument(
        "--toy-steps", type=int, default=500, help="toy-problem steps per start (default 500)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the multi-task problem")
    parser.add_argument(
        "--only", choices=("multitask", "toy"), help="run one of the two experiments only"
    )
    parser.add_argument(
        "--plots",
        metavar="DIR",
        type=Path,
        help="write PNG plots (loss curves, toy trajectories) into DIR; needs matplotlib",
    )
    parser.add_argument("--list", action="store_true", help="list the known methods and exit")
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run the demo; returns the process exit status."""
    out = sys.stdout if stream is None else stream
    args = build_parser().parse_args(argv)
    if args.list:
        print("\n".join(methods.available()), file=out)
        return 0
    try:
        chosen = methods.resolve([m.strip() for m in args.methods.split(",") if m.strip()])
    except ValueError as error:
        print(f"jdoptim: error: {error}", file=sys.stderr)
        return 2
    chosen = methods.resolve([methods.BASELINE, *chosen])
    if args.steps < 1 or args.toy_steps < 1:
        print("jdoptim: error: --steps and --toy-steps must be positive.", file=sys.stderr)
        return 2
    if args.plots is not None:
        from .plots import matplotlib_available

        if not matplotlib_available():
            print(
                'jdoptim: --plots needs matplotlib: pip install "jdoptim[plot]".', file=sys.stderr
            )
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
        if args.only in (None, "toy"):
            toy_results = _run_toy(chosen, args.toy_steps, out)
    finally:
        torch.set_num_threads(threads)
    if args.plots is not None:
        _write_plots(args.plots, task_results, toy_results, out)
    print(f"\nDone in {time.perf_counter() - begin:.0f} s.", file=out)
    return 0


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
    results = []
    with ProgressBar(len(chosen) * steps, "multi-task training") as bar:
        for method in chosen:
            results.append(
                multitask.train(problem, method, steps, on_step=lambda m=method: bar.update(1, m))
            )
    print(report.multitask_table(results), file=out)
    print(
        "   'got worse': final loss above the starting loss. 'conflicts': JD steps where the\n"
        "   gradients of two tasks pointed against each other (g_i . g_j < 0, read off the step's\n"
        "   Gramian). 'time/step': wall time of a step relative to the plain summed-loss step.",
        file=out,
    )
    return results


def _run_toy(chosen: Sequence[str], steps: int, out: TextIO) -> list[toy.ToyResult]:
    print(
        "\n2. The two-objective toy problem of CAGrad (Liu et al., 2021) and Nash-MTL (Navon et "
        "al., 2022):\n   from five starting points, does Adam reach the Pareto set "
        f"(x2 = {toy.PARETO_X2}, |x1| <= 7) within {steps} steps?",
        file=out,
    )
    results = []
    with ProgressBar(len(chosen) * len(toy.STARTS) * steps, "toy problem") as bar:
        for method in chosen:
            results.append(
                toy.optimise(method, steps=steps, on_step=lambda m=method: bar.update(1, m))
            )
    print(report.toy_table(results), file=out)
    print("   (x1, x2): where each run ended; ✓ within 0.3 of the Pareto set.", file=out)
    return results


def _write_plots(
    directory: Path,
    task_results: Sequence[multitask.MultiTaskResult],
    toy_results: Sequence[toy.ToyResult],
    out: TextIO,
) -> None:
    from .plots import plot_multitask, plot_toy

    written = []
    if task_results:
        written.append(plot_multitask(task_results, directory / "multitask_losses.png"))
    if toy_results:
        written.append(plot_toy(toy_results, directory / "toy_trajectories.png"))
    for path in written:
        print(f"Wrote {path}", file=out)
