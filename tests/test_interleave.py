"""The benchmarks' block interleaving (``benchmarks.interleave.block_ratios``): each step runs
in blocks of consecutive calls, every step in every cycle, and the medians come back by name.
(What it measures is timing, which a unit test does not assert; the counts and order are
checked here.)"""

from __future__ import annotations

from benchmarks.interleave import block_ratios


def test_each_step_runs_in_consecutive_blocks_in_every_cycle():
    calls: list[str] = []
    steps = {"plain": lambda: calls.append("plain"), "jd": lambda: calls.append("jd")}
    medians = block_ratios(steps, cycles=3, block=4, warmup=1)
    assert set(medians) == {"plain", "jd"}
    assert all(value >= 0.0 for value in medians.values())
    assert calls[:2] == ["plain", "jd"]  # the warm-up, one of each
    cycle = ["plain"] * 6 + ["jd"] * 6  # two untimed, then a block of four timed, each
    assert calls[2:] == cycle * 3
