"""A JD step (explicit-Jacobian path) vs a plain summed-loss step, same model, batch and run.

Each benchmark times the JD step with pytest-benchmark and, in the same run, the ratio to a plain
``sum(losses).backward(); adam.step()`` step timed alternately with it (see ``interleave.py``).

Run: ``python -m pytest benchmarks/test_bench_step.py --benchmark-only
--benchmark-json=/tmp/step.json && python benchmarks/report.py /tmp/step.json``
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.interleave import interleaved_ratio
from benchmarks.models import TrunkWithHeads, make_batch, task_losses
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


@pytest.mark.parametrize("m", [2, 4, 8, 16])
def test_jd_upgrad_step_vs_plain(benchmark, m):
    benchmark.group = "JD step (Jacobian path), trunk 256-512-512-256, batch 128, Adam"
    x, y = make_batch(m)
    plain_model, jd_model = TrunkWithHeads(m), TrunkWithHeads(m)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-4)
    jd = JDOptimizer(torch.optim.Adam(jd_model.parameters(), lr=1e-4), UPGrad())

    def plain_step():
        plain.zero_grad()
        sum(task_losses(plain_model, x, y)).backward()
        plain.step()

    def jd_step():
        jd.zero_grad()
        jd.step(task_losses(jd_model, x, y))

    benchmark.extra_info.update(interleaved_ratio(jd_step, plain_step, rounds=15))
    benchmark.extra_info["m"] = m
    benchmark.pedantic(jd_step, rounds=10, warmup_rounds=1)
