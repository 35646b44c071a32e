"""Representation-level JD (``opt.step(losses, features=z)``) vs a plain summed-loss step.

The weights come from the Gramian of ``∂ℓᵢ/∂z`` (``z`` the trunk's output), so the step costs a
plain step plus the heads' share of a batched backward, whatever the trunk's size; the target
of issue 17 is at most 1.2x a plain step at 8 and at 32 tasks (the exact engine needs about
``0.75·m`` backward passes). Same model, batch and Adam as ``test_bench_step.py``; the ratio comes
from steps timed alternately in the same run (``interleave.py``).

Run: ``python -m pytest benchmarks/test_bench_features.py --benchmark-only
--benchmark-json=/tmp/features.json && python benchmarks/report.py /tmp/features.json``
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from benchmarks.interleave import interleaved_ratio
from benchmarks.models import TrunkWithHeads, make_batch
from jdoptim import JDOptimizer
from jdoptim.aggregation import MGDA, UPGrad


def _losses_and_features(
    model: TrunkWithHeads, x: Tensor, y: Tensor
) -> tuple[list[Tensor], Tensor]:
    z = model.trunk(x)
    losses = [(head(z).squeeze(-1) - y[:, t]).pow(2).mean() for t, head in enumerate(model.heads)]
    return losses, z


@pytest.mark.parametrize("method", ["upgrad", "mgda"])
@pytest.mark.parametrize("m", [8, 32])
def test_features_step_vs_plain(benchmark, m, method):
    benchmark.group = "JD step on features z (trunk 256-512-512-256, batch 128, Adam)"
    x, y = make_batch(m)
    plain_model, jd_model = TrunkWithHeads(m), TrunkWithHeads(m)
    plain = torch.optim.Adam(plain_model.parameters(), lr=1e-4)
    aggregator = UPGrad() if method == "upgrad" else MGDA()
    jd = JDOptimizer(torch.optim.Adam(jd_model.parameters(), lr=1e-4), aggregator)

    def plain_step():
        plain.zero_grad()
        losses, _ = _losses_and_features(plain_model, x, y)
        sum(losses).backward()
        plain.step()

    def jd_step():
        jd.zero_grad()
        losses, z = _losses_and_features(jd_model, x, y)
        jd.step(losses, features=z)

    jd_step()
    assert jd.last_record is not None and jd.last_record.extras.get("features") is True
    benchmark.extra_info.update(interleaved_ratio(jd_step, plain_step, rounds=15))
    benchmark.extra_info.update({"m": m, "method": method, "target_ratio": 1.2})
    benchmark.pedantic(jd_step, rounds=10, warmup_rounds=1)
