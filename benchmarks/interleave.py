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
