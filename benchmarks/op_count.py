"""Tensor operations per training step: a noise-free measure of a step's fixed overhead.

On these shared CPUs a 5% change in a step's time is within the noise of a timed run, but every
tensor operation costs a few microseconds of dispatch (more right after large matrix products),
so the number of operations a step dispatches is a deterministic proxy for its fixed overhead.
This counts them with a :class:`~torch.utils._python_dispatch.TorchDispatchMode` (operations the
autograd engine runs during a backward pass included) for the cases of
:mod:`benchmarks.test_bench_engine`, for the plain step and the engine's step.

Run: ``python benchmarks/op_count.py`` (a markdown table), or ``python benchmarks/op_count.py
--where "per-sample losses, batch 16"`` to list the JD step's operations by the line of
``jdoptim`` that issued them.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.test_bench_engine import CASES, make_step


class OperationCounter(TorchDispatchMode):
    """Counts the ATen operations dispatched while active, keyed by operation (and, with
    ``where=True``, by the innermost ``jdoptim`` source line that issued them)."""

    def __init__(self, where: bool = False) -> None:
        super().__init__()
        self.where = where
        self.counts: Counter[tuple[str, str]] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        site = ""
        if self.where:
            for frame in reversed(traceback.extract_stack(limit=40)):
                if "/jdoptim/" in frame.filename:
                    site = f"{frame.filename.split('/jdoptim/')[-1]}:{frame.lineno}"
                    break
        self.counts[(site, str(func))] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_operations(case: str, method: str, where: bool = False) -> OperationCounter:
    """The operations of one step of ``method`` on ``case``, after three warm-up steps."""
    step = make_step(case, method)
    for _ in range(3):
        step()
    with OperationCounter(where) as counter:
        step()
    return counter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--where", metavar="CASE", help="list the JD step's operations by line")
    options = parser.parse_args()
    if options.where:
        counter = count_operations(options.where, "jdoptim UPGrad", where=True)
        for (site, op), n in sorted(counter.counts.items()):
            if site:
                print(f"{n:4d}  {site:40s} {op}")
        print(
            f"total {counter.total}, the model's forward and loss included; the wrapped "
            "optimizer's operations are listed under the line of JDOptimizer that calls it"
        )
        return
    print("| case | plain step | jdoptim UPGrad | jdoptim Mean |")
    print("|---|---|---|---|")
    for case in CASES:
        totals = [
            count_operations(case, m).total for m in ("plain", "jdoptim UPGrad", "jdoptim Mean")
        ]
        print(f"| {case} | " + " | ".join(str(t) for t in totals) + " |")


if __name__ == "__main__":
    main()
