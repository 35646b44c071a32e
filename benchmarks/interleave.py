"""Interleaved timing: the ratio of two step functions measured alternately in the same run.

On shared machines, absolute times drift with the load of the other processes; timing a JD step
and its plain baseline alternately, round by round, and taking the median of the per-round ratios
cancels most of that drift.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch


def interleaved_ratio(
    candidate: Callable[[], object],
    baseline: Callable[[], object],
    rounds: int = 20,
    warmup: int = 3,
) -> dict[str, float]:
    """Median of ``time(candidate) / time(baseline)`` over ``rounds`` alternated rounds."""
    for _ in range(warmup):
        baseline()
        candidate()
    ratios, base_times, cand_times = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        baseline()
        middle = time.perf_counter()
        candidate()
        end = time.perf_counter()
        base_times.append(middle - start)
        cand_times.append(end - middle)
        ratios.append((end - middle) / (middle - start))
    return {
        "ratio_median": statistics.median(ratios),
        "baseline_ms": statistics.median(base_times) * 1e3,
        "candidate_ms": statistics.median(cand_times) * 1e3,
    }


def block_ratios(
    steps: dict[str, Callable[[], object]], cycles: int = 8, block: int = 8, warmup: int = 3
) -> dict[str, float]:
    """Median time of each step in the *steady state*: over ``cycles`` cycles, each step in turn
    runs two untimed steps, then ``block`` consecutive timed steps (their median is the cycle's
    time); returns each step's median over the cycles, in ms.

    :func:`interleaved_ratio` alternates the steps one by one, so each runs right after the
    other, with the other's data in the caches. A training loop runs the same step again and
    again; on this machine's small models the plain step is then up to 12% faster than right
    after a JD step, and the JD step barely faster (RESULTS.md, "Steady state"). Blocks measure
    what a training loop sees, still interleaved (block by block) against the drift of the
    machine's load."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(cycles):
        for name, step in steps.items():
            step()
            step()
            timed = []
            for _ in range(block):
                start = time.perf_counter()
                step()
                timed.append(time.perf_counter() - start)
            times[name].append(statistics.median(timed))
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def ratio_row(cells: Sequence[object], result: dict[str, float]) -> str:
    """A markdown table row: the given leading ``cells``, then the baseline's and the candidate's
    median times (ms) and the median ratio of :func:`interleaved_ratio`'s ``result``."""
    leading = " | ".join(str(cell) for cell in cells)
    return (
        f"| {leading} | {result['baseline_ms']:.2f} | {result['candidate_ms']:.2f} | "
        f"{result['ratio_median']:.3f}× |"
    )


def int_option(argv: Sequence[str], name: str, default: int) -> int:
    """The integer after ``name`` in ``argv`` (e.g. ``--batch 512``), else ``default``."""
    if name in argv:
        return int(argv[argv.index(name) + 1])
    return default


def start_table(
    quick: bool, batch: int, step_column: str, bound: str
) -> tuple[int, tuple[int, ...], int]:
    """Set 2 threads, print the header of a :func:`ratio_row` table (``step_column`` names the
    timed step, ``bound`` the ratio's budget) and return ``(batch, widths, rounds)`` of the
    shared MLP of :mod:`benchmarks.models`: trunk 256-512-512-256 and 30 rounds
    (``BENCH_ROUNDS`` sets another count), or with ``quick`` tiny sizes and 3 rounds (a check that
    the table runs, not figures)."""
    torch.set_num_threads(2)
    rounds = int(os.environ.get("BENCH_ROUNDS", "30"))
    widths, rounds = ((16, 32, 16), 3) if quick else ((256, 512, 512, 256), rounds)
    print(f"| method | m | plain (ms) | {step_column} (ms) | ratio ({bound}) |")
    print("|---|---|---|---|---|")
    return (8 if quick else batch), widths, rounds
