"""Interleaved timing: the ratio of two step functions measured alternately in the same run.

On shared machines, absolute times drift with the load of the other processes; timing a JD step
and its plain baseline alternately, round by round, and taking the median of the per-round ratios
cancels most of that drift.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


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
