"""Loss-only methods: ``JDOptimizer(adam, scalarizer).step(losses)`` vs a plain summed step.

Budget (issue 17): a scalarizer's step costs at most **1.15×** ``sum(losses).backward();
adam.step()`` on the same model and batch. Model: the shared MLP trunk 256→512→512→256 of
:mod:`benchmarks.models` with one head per task, batch 128, Adam, 2 threads; ``m = 2, 8`` tasks.
Each JD step is timed alternately with its plain step
(:func:`benchmarks.interleave.interleaved_ratio`), the median ratio reported. FAMO is timed in
its no-extra-forward mode (the losses given; its logit update waits for the next step); the
``FAMO+closure`` row recomputes the losses after the step (the paper's algorithm: one more
forward by design, outside the budget).

Run: ``python -m pytest benchmarks/test_bench_scalarization.py --benchmark-only -q
--benchmark-json=/tmp/scal.json && python benchmarks/report.py /tmp/scal.json``, or
``python benchmarks/test_bench_scalarization.py`` for the markdown table (``--quick``: tiny
sizes, a check that it runs, not figures).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import Tensor

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jdoptim.scalarization as S
from benchmarks.interleave import int_option, interleaved_ratio, ratio_row, start_table
from benchmarks.models import TrunkWithHeads, make_batch, task_losses
from jdoptim import JDOptimizer
from jdoptim.linalg.finite import all_finite

BUDGET = 1.15

METHODS: dict[str, Callable[[int], S.Scalarizer]] = {
    "Sum": lambda m: S.Sum(),
    "Mean": lambda m: S.Mean(),
    "Constant": lambda m: S.Constant(torch.full((m,), 1.0 / m)),
    "GeometricMean": lambda m: S.GeometricMean(),
    "COSMOS": lambda m: S.COSMOS(0.5, torch.full((m,), 1.0 / m)),
    "PBI": lambda m: S.PBI(5.0, torch.full((m,), 1.0 / m)),
    "Random": lambda m: S.Random(seed=0),
    "STCH": lambda m: S.STCH(0.1, warmup_steps=2),
    "UW": lambda m: S.UW(m),
    "IMTLL": lambda m: S.IMTLL(m),
    "DWA": lambda m: S.DWA(window=4),
    "FAMO": lambda m: S.FAMO(m),
    "FAMO+closure": lambda m: S.FAMO(m),
}


def _plain_setup(
    m: int, batch: int, widths: tuple[int, ...]
) -> tuple[Tensor, Tensor, TrunkWithHeads, Callable[[], None]]:
    """The batch, a fresh model for the step under test, and the plain summed step on an
    identical model of its own."""
    x, y = make_batch(m, batch=batch, d_in=widths[0])
    plain_model, model = TrunkWithHeads(m, widths), TrunkWithHeads(m, widths)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-4)

    def plain_step() -> None:
        plain.zero_grad()
        sum(task_losses(plain_model, x, y)).backward()
        plain.step()

    return x, y, model, plain_step


def step_pair(
    name: str, m: int, batch: int, widths: tuple[int, ...]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The JD step of method ``name`` and the plain summed step, on identical models."""
    x, y, jd_model, plain_step = _plain_setup(m, batch, widths)
    jd = JDOptimizer(torch.optim.Adam(jd_model.parameters(), lr=1e-4), METHODS[name](m))

    def jd_step() -> None:
        jd.zero_grad()
        if name == "FAMO+closure":
            jd.step(closure=lambda: task_losses(jd_model, x, y))
        else:
            jd.step(task_losses(jd_model, x, y))

    return jd_step, plain_step


def bare_step_pair(
    m: int, batch: int, widths: tuple[int, ...]
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The floor of a loss-only step, written by hand for this model (Sum's weights): stack the
    losses, one ``torch.autograd.grad``, the finiteness check of the gradients that a refused
    step needs (:func:`jdoptim.linalg.finite.all_finite`), store them, Adam; no parsing or
    checks of the losses, no effective weights, no record. And the plain summed step."""
    x, y, bare_model, plain_step = _plain_setup(m, batch, widths)
    bare = torch.optim.Adam(bare_model.parameters(), lr=1e-4)
    params = list(bare_model.parameters())
    ones = torch.ones(m)

    def bare_step() -> None:
        bare.zero_grad()
        grads = torch.autograd.grad(torch.stack(task_losses(bare_model, x, y)), params, ones)
        if not all_finite(list(grads)):
            raise FloatingPointError("non-finite gradient")
        for param, grad in zip(params, grads):
            param.grad = grad
        bare.step()

    return bare_step, plain_step


@pytest.mark.parametrize("m", [2, 8])
@pytest.mark.parametrize("name", list(METHODS))
def test_scalarized_step_vs_plain(benchmark, name: str, m: int) -> None:
    benchmark.group = f"scalarizer step, trunk 256-512-512-256, batch 128, Adam, m={m}"
    jd_step, plain_step = step_pair(name, m, 128, (256, 512, 512, 256))
    benchmark.extra_info.update(interleaved_ratio(jd_step, plain_step, rounds=30))
    benchmark.extra_info.update({"m": m, "method": name, "budget": BUDGET})
    benchmark.pedantic(jd_step, rounds=10, warmup_rounds=1)


def table(quick: bool, batch: int = 128) -> None:
    """Print the markdown table (``--batch N``: another batch size than the benchmark's 128)."""
    batch, widths, rounds = start_table(quick, batch, "JD", f"budget {BUDGET}×")
    for m in (2, 8):
        r = interleaved_ratio(*bare_step_pair(m, batch, widths), rounds=rounds)
        print(ratio_row(["(floor: bare step by hand)", m], r))
        for name in METHODS:
            jd_step, plain_step = step_pair(name, m, batch, widths)
            r = interleaved_ratio(jd_step, plain_step, rounds=rounds)
            print(ratio_row([name, m], r))


if __name__ == "__main__":
    table(quick="--quick" in sys.argv, batch=int_option(sys.argv, "--batch", 128))
