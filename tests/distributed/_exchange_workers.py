"""Spawned workers: which Gramian terms the distributed engine gathers, and that they are exact.

A model of Linear-like layers that are not ``nn.Linear`` (transformers' ``Conv1D`` and a user
rule with a transposed weight, both :class:`~jdoptim.autogram.rules.LinearLikeRule`
subclasses) and a depthwise ``Conv1d`` (grouped: its terms are rows), on per-sample losses over
unequal shards. Each step's distributed Gramian is compared with the explicit Jacobian's
``J Jᵀ`` of the global batch (one autograd backward per loss, on a single-process copy of the
model) and with a single-process engine's step; the gathered terms are read from
``DistributedGramianUpdate.last_exchange``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from jdoptim import JDOptimizer, UPGrad
from jdoptim.autogram.rules import LinearLikeRule, register_rule
from jdoptim.distributed import DistributedGramianUpdate
from jdoptim.distributed.engine import ExchangedTerm

from ._workers import _leave_without_teardown, close, init, step_per_sample_against_reference

STEPS = 2
SIZES = [3, 5]


class Transposed(nn.Module):
    """``Y = X K`` with the weight ``kernel`` stored ``[in, out]`` and a bias ``shift``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)
        self.shift = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel + self.shift


@register_rule(Transposed)
class TransposedRule(LinearLikeRule):
    weight_layout = "in_out"
    weight_name = "kernel"
    bias_name = "shift"


class Projections(nn.Module):
    """Conv1D → Transposed on 2 positions per sample, then a depthwise Conv1d and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1d = Conv1D(8, 6)  # transformers' argument order: (out, in)
        self.mine = Transposed(8, 8)
        self.depthwise = nn.Conv1d(8, 8, kernel_size=2, groups=8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:  # x: [b, 2, 6]
        h = torch.tanh(self.mine(torch.tanh(self.conv1d(x))))  # [b, 2, 8]
        h = torch.tanh(self.depthwise(h.transpose(1, 2)).squeeze(-1))  # [b, 8]
        return self.head(h).squeeze(-1)


def _data(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(4000 + step)
    x = torch.randn(sum(SIZES), 2, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(sum(SIZES), generator=generator, dtype=torch.float64)


def _losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).pow(2)


def _explicit_gramian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """``J Jᵀ`` of the global per-sample losses, one autograd backward per loss."""
    params = list(model.parameters())
    losses = _losses(model, x, y)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses
    ]
    jacobian = torch.stack(rows)
    return jacobian @ jacobian.T


def _check_exchange(exchange: list[ExchangedTerm]) -> None:
    """The Linear-like layers send their kernel factors (``S (d + o) ≤ o d``); the depthwise
    convolution its weight and bias rows, as does the head (``d + o > o d`` for ``o = 1``)."""
    found = sorted((term.module, term.kind) for term in exchange)
    expected = sorted(
        [
            ("'conv1d' (Conv1D)", "kernel"),
            ("'mine' (Transposed)", "kernel"),
            ("'depthwise' (Conv1d)", "rows"),
            ("'depthwise' (Conv1d)", "rows"),
            ("'head' (Linear)", "rows"),
            ("'head' (Linear)", "rows"),
        ]
    )
    assert found == expected, found


def run_exchange(rank: int, world: int, port: int) -> None:
    init(rank, world, port)
    try:
        torch.manual_seed(0)
        reference = Projections().double()
        explicit = Projections().double()
        model = Projections().double()
        explicit.load_state_dict(reference.state_dict())
        model.load_state_dict(reference.state_dict())
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), UPGrad(), modules=model,
                          batch_dim=0, process_group=dist.group.WORLD)  # fmt: skip
        update = opt._update_computer
        assert isinstance(update, DistributedGramianUpdate)
        ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.05), UPGrad(),
                              modules=reference, batch_dim=0)  # fmt: skip
        for step in range(STEPS):
            x, y = _data(step)
            expected = _explicit_gramian(explicit, x, y)
            what = f"Linear-like exchange, step {step}"
            record = step_per_sample_against_reference(
                opt, ref_opt, _losses, (model, model, reference), x, y, SIZES, rank, what
            )
            close(record.gramian, expected, f"{what}: Gramian against J Jᵀ")  # type: ignore[arg-type]
            _check_exchange(update.last_exchange)
            explicit.load_state_dict(reference.state_dict())
    finally:
        dist.destroy_process_group()
    _leave_without_teardown()
