"""Per-sample and task steps on the real models in the steady state of a training loop, against
the same steps alternated one by one.

:func:`benchmarks.interleave.interleaved_ratio` (every table of ``RESULTS.md`` before the
twentieth session) times a plain step and a JD step alternately, each right after the other.
A training loop repeats one step; then the plain step of these small models runs up to 12%
faster (its data stays in the caches) and the JD step barely faster, so the alternated ratio
understates the JD step's cost. This script measures both ways in one process, for the library,
the plain step and the engine's floor (:mod:`benchmarks.hand_fused_per_sample`,
:mod:`benchmarks.hand_fused_models`: the same products without the step's bookkeeping):

* *alternated*: ``rounds`` rounds of one step each, in turn (medians of the per-step times);
* *steady state*: :func:`benchmarks.interleave.block_ratios`, blocks of 8 consecutive timed
  steps of each, 8 cycles.

Run: ``PYTHONPATH=$PWD python benchmarks/steady_state.py [model:setting,...]`` (default: the
per-sample and 2-task rows of GPT-2 tiny, Llama small and ViT, and ResNet-18 GN per-sample);
``BENCH_BATCH=n`` as in :mod:`benchmarks.test_bench_models`.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hand_fused_models import make_floor_step
from benchmarks.hand_fused_per_sample import make_per_sample_floor_step
from benchmarks.interleave import block_ratios
from benchmarks.test_bench_models import THREADS, TINY, make_step

DEFAULT = (
    "gpt2-tiny:per-sample,llama-small:per-sample,vit:per-sample,resnet18-gn:per-sample,"
    "gpt2-tiny:2 tasks,llama-small:2 tasks,vit:2 tasks"
)


def alternated(steps: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median time of each step (ms) over ``rounds`` rounds running each once, in turn."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def measure(model_name: str, setting: str) -> tuple[dict[str, float], dict[str, float]]:
    """``(alternated, steady)`` medians (ms) of the plain, JD and floor steps."""
    floor = (
        make_per_sample_floor_step(model_name)
        if setting == "per-sample"
        else make_floor_step(model_name, setting)
    )
    steps = {
        "plain": make_step(model_name, setting, "plain"),
        "jd": make_step(model_name, setting, "jdoptim UPGrad"),
        "floor": floor,
    }
    cycles, block = (2, 2) if TINY else (8, 8)
    steady = block_ratios(steps, cycles=cycles, block=block)
    return alternated(steps, 4 if TINY else 40), steady


def main() -> None:
    torch.set_num_threads(THREADS)
    items = sys.argv[1] if len(sys.argv) > 1 else DEFAULT
    print(
        "| model | setting | plain (ms), alternated / steady | JD / plain, alternated / steady "
        "| floor / plain, alternated / steady | JD / floor, steady |"
    )
    print("|---|---|---|---|---|---|")
    for item in items.split(","):
        model_name, setting = item.split(":")
        alt, steady = measure(model_name, setting)
        print(
            f"| {model_name} | {setting} | {alt['plain']:.2f} / {steady['plain']:.2f} "
            f"| {alt['jd'] / alt['plain']:.2f}× / {steady['jd'] / steady['plain']:.2f}× "
            f"| {alt['floor'] / alt['plain']:.2f}× / {steady['floor'] / steady['plain']:.2f}× "
            f"| {steady['jd'] / steady['floor']:.2f}× |"
        )


if __name__ == "__main__":
    main()
