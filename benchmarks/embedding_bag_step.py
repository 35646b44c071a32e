"""A multi-task recommendation step: a sparse ``nn.EmbeddingBag`` table and two task towers.

The README's recommendation recipe with a bag instead of a plain embedding: 256 samples, each
a bag of 1–7 item ids from a table of ``V`` rows (``sparse=True``, bags from ``offsets``), two
towers (click, purchase), ``Adagrad``. Prints the JD step's and the plain summed-loss step's
median times, interleaved (:func:`benchmarks.interleave.interleaved_ratio`), and the process's
peak resident memory.

Run: ``PYTHONPATH=$PWD python benchmarks/embedding_bag_step.py [V]`` (default one million).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interleave import interleaved_ratio
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


def make_steps(rows: int) -> tuple[Callable[[], None], Callable[[], None]]:
    """The JD step and the plain step, on one model and optimizer, each on a fresh batch."""
    torch.manual_seed(0)
    bag = nn.EmbeddingBag(rows, 32, mode="sum", sparse=True)
    towers = nn.ModuleDict({"click": nn.Linear(32, 1), "purchase": nn.Linear(32, 1)})
    model = nn.ModuleDict({"bag": bag, "towers": towers})
    opt = JDOptimizer(torch.optim.Adagrad(model.parameters(), lr=0.05), UPGrad(), modules=model)

    def losses() -> list[Tensor]:
        sizes = torch.randint(1, 8, (256,))
        ids = torch.randint(0, rows, (int(sizes.sum()),))
        z = bag(ids, torch.cumsum(sizes, 0) - sizes)
        return [towers["click"](z).pow(2).mean(), towers["purchase"](z).abs().mean()]

    def jd() -> None:
        opt.zero_grad()
        opt.step(losses())

    def plain() -> None:
        opt.optimizer.zero_grad()
        sum(losses()).backward()  # type: ignore[union-attr]
        opt.optimizer.step()

    return jd, plain


def main() -> None:
    torch.set_num_threads(2)
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    jd, plain = make_steps(rows)
    result = interleaved_ratio(jd, plain, rounds=30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rows {rows}: {result}; peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
