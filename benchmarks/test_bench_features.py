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
from typing import Any

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


def bare_step_pair(
    method: str, m: int, batch: int = 128, widths: tuple[int, ...] = (256, 512, 512, 256)
) -> tuple[Callable[[], None], Callable[[], None]]:
    """The ``features=`` step written by hand for this model, with none of the library's
    parsing, planning, checks or record: the forward; one backward of ``Σᵢ ℓᵢ`` to ``z`` and the
    heads, with a hook on each head's consumer of ``z`` that copies its gradient into row ``i``
    of ``Z``; ``Z Zᵀ`` and the weights; one backward of ``z`` with ``Σᵢ wᵢ Zᵢ``; Adam. And the
    plain summed step. Their ratio is the floor of an implementation that catches the rows
    (what any exact one must do) and is only as safe as this model's structure is known."""
    _, plain_step, _ = step_pair(method, m, batch, widths)
    x, y = make_batch(m, batch=batch, d_in=widths[0])
    model = TrunkWithHeads(m, widths)
    bare = torch.optim.Adam(model.parameters(), lr=1e-4)
    weighting = (UPGrad() if method == "upgrad" else MGDA()).weighting
    trunk, heads = list(model.trunk.parameters()), list(model.heads.parameters())

    def bare_step() -> None:
        bare.zero_grad()
        losses, z = _losses_and_features(model, x, y)
        rows = z.new_empty((m, *z.shape))

        def catcher(index: int) -> Callable:
            def hook(grad_inputs: tuple[Tensor, ...], _: object) -> None:
                rows[index].copy_(grad_inputs[1])  # addmm's input z

            return hook

        hooks = [node.register_hook(catcher(i)) for i, node in enumerate(_consumers(losses))]
        head_grads = torch.autograd.grad(losses, [*heads, z], retain_graph=True)[:-1]
        for hook in hooks:
            hook.remove()
        flat = rows.view(m, -1)
        with torch.no_grad():
            weights = weighting(flat @ flat.T)
            trunk_grads = torch.autograd.grad(z, trunk, (weights @ flat).view_as(z))
        for param, grad in zip(heads + trunk, list(head_grads) + list(trunk_grads)):
            param.grad = grad
        bare.step()

    return bare_step, plain_step


def _consumers(losses: list[Tensor]) -> list[Any]:
    """The output of each head's ``addmm`` (the node that takes ``z``), found from its loss:
    ``mean ← pow ← sub ← squeeze ← addmm`` in ``_losses_and_features``."""
    found = []
    for loss in losses:
        node = loss.grad_fn
        while type(node).__name__ != "AddmmBackward0":
            node = node.next_functions[0][0]
        found.append(node)
    return found


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
        r = interleaved_ratio(*bare_step_pair("upgrad", m, batch, widths), rounds=rounds)
        print(ratio_row(["(floor: upgrad step by hand)", m], r))
        for method in ("upgrad", "mgda"):
            jd_step, plain_step, _ = step_pair(method, m, batch, widths)
            r = interleaved_ratio(jd_step, plain_step, rounds=rounds)
            print(ratio_row([method, m], r))


if __name__ == "__main__":
    table(quick="--quick" in sys.argv, batch=int_option(sys.argv, "--batch", 128))
