"""Representation-level JD (``opt.step(losses, features=z)``) vs a plain summed-loss step.

The weights come from the Gramian of ``∂ℓᵢ/∂z`` (``z`` the trunk's output), so the step costs a
plain step plus the heads' share of a batched backward, whatever the trunk's size; the target
of issue 17 is at most 1.2x a plain step at 8 and at 32 tasks (the exact engine needs about
``0.75·m`` backward passes). Same model, batch and Adam as ``test_bench_step.py``; the ratio comes
from steps timed alternately in the same run (``interleave.py``).

Run: ``python -m pytest benchmarks/test_bench_features.py --benchmark-only
--benchmark-json=/tmp/features.json && python benchmarks/report.py /tmp/features.json``, or
``python benchmarks/test_bench_features.py`` for the markdown table (``--quick``: tiny sizes, a
check that it runs, not figures).
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

from benchmarks.interleave import int_option, interleaved_ratio, ratio_row, start_table
from benchmarks.models import TrunkWithHeads, make_batch
from jdoptim import JDOptimizer
from jdoptim.aggregation import MGDA, UPGrad

TARGET = 1.2


def _losses_and_features(
    model: TrunkWithHeads, x: Tensor, y: Tensor
) -> tuple[list[Tensor], Tensor]:
    z = model.trunk(x)
    losses = [(head(z).squeeze(-1) - y[:, t]).pow(2).mean() for t, head in enumerate(model.heads)]
    return losses, z


def step_pair(
    method: str, m: int, batch: int = 128, widths: tuple[int, ...] = (256, 512, 512, 256)
) -> tuple[Callable[[], None], Callable[[], None], JDOptimizer]:
    """The ``features=`` step of ``method`` (``"upgrad"`` or ``"mgda"``), the plain summed step
    on an identical model, and the JD optimizer."""
    x, y = make_batch(m, batch=batch, d_in=widths[0])
    plain_model, jd_model = TrunkWithHeads(m, widths), TrunkWithHeads(m, widths)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-4)
    aggregator = UPGrad() if method == "upgrad" else MGDA()
    jd = JDOptimizer(torch.optim.Adam(jd_model.parameters(), lr=1e-4), aggregator)

    def plain_step() -> None:
        plain.zero_grad()
        losses, _ = _losses_and_features(plain_model, x, y)
        sum(losses).backward()
        plain.step()

    def jd_step() -> None:
        jd.zero_grad()
        losses, z = _losses_and_features(jd_model, x, y)
        jd.step(losses, features=z)

    return jd_step, plain_step, jd


def arithmetic_floor_pair(
    m: int, batch: int = 128, widths: tuple[int, ...] = (256, 512, 512, 256)
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The method's own arithmetic on top of a plain step: the plain summed step plus stacking
    ``m`` rows of ``|z| = batch · widths[-1]`` values and ``Z Zᵀ`` (no weights, no bookkeeping);
    and the plain step. Their ratio is what no implementation of ``features=`` can go below."""
    _, plain_step, _ = step_pair("mgda", m, batch, widths)
    parts = [torch.randn(batch, widths[-1]) for _ in range(m)]

    def plain_and_gramian() -> None:
        plain_step()
        rows = torch.stack(parts).reshape(m, -1)
        _ = rows @ rows.T

    return plain_and_gramian, plain_step


@pytest.mark.parametrize("method", ["upgrad", "mgda"])
@pytest.mark.parametrize("m", [8, 32])
def test_features_step_vs_plain(benchmark, m, method):
    benchmark.group = "JD step on features z (trunk 256-512-512-256, batch 128, Adam)"
    jd_step, plain_step, jd = step_pair(method, m)
    jd_step()
    assert jd.last_record is not None and jd.last_record.extras.get("features") is True
    benchmark.extra_info.update(interleaved_ratio(jd_step, plain_step, rounds=15))
    benchmark.extra_info.update({"m": m, "method": method, "target_ratio": TARGET})
    benchmark.pedantic(jd_step, rounds=10, warmup_rounds=1)


def table(quick: bool, batch: int = 128) -> None:
    """Print the markdown table (``--batch N``: another batch size than the benchmark's 128)."""
    batch, widths, rounds = start_table(quick, batch, "JD features=", f"target {TARGET}×")
    for m in (8, 32):
        r = interleaved_ratio(*arithmetic_floor_pair(m, batch, widths), rounds=rounds)
        print(ratio_row(["(floor: plain + Z Zᵀ)", m], r))
        for method in ("upgrad", "mgda"):
            jd_step, plain_step, _ = step_pair(method, m, batch, widths)
            r = interleaved_ratio(jd_step, plain_step, rounds=rounds)
            print(ratio_row([method, m], r))


if __name__ == "__main__":
    table(quick="--quick" in sys.argv, batch=int_option(sys.argv, "--batch", 128))
