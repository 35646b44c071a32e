"""Spawned workers: distributed JD with the Gramian engine (``modules=``) on per-sample losses.

Each check runs the distributed step and, in the same process, an independent single-process
``JDOptimizer(modules=reference, batch_dim=0)`` on the concatenated global batch, and compares
Gramians, weights and parameters after every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDOptimizer, UPGrad
from jdoptim.aggregation import Aggregator, GradVac, PCGrad
from jdoptim.distributed import DistributedGramianUpdate

from ._workers import (
    _leave_without_teardown,
    close,
    compare_params,
    init,
    shard,
    step_per_sample_against_reference,
)

STEPS = 3
VOCAB, SEQ = 11, 5


class NormMLP(nn.Module):
    """Linear + LayerNorm layers."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(6, 10), nn.LayerNorm(10), nn.Tanh(), nn.Linear(10, 8), nn.LayerNorm(8),
            nn.ReLU(), nn.Linear(8, 3),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Gain(nn.Module):
    """No rule is registered for this module: the engine's ``torch.func`` fallback handles it."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, size))
        self.shift = nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x * self.gain + self.shift)


class SequenceModel(nn.Module):
    """Embedding → Conv1d → fallback module → Linear (one output per sample)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4, padding_idx=0)
        self.conv = nn.Conv1d(4, 3, kernel_size=2)
        self.gain = Gain(3 * (SEQ - 1))
        self.head = nn.Linear(3 * (SEQ - 1), 1)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).flatten(1)
        return self.head(self.gain(h)).squeeze(-1)


def _norm_data(step: int, batch: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2000 + step)
    x = torch.randn(batch, 6, generator=generator, dtype=torch.float64)
    return x, torch.randn(batch, 3, generator=generator, dtype=torch.float64)


def _sequence_data(step: int, batch: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(3000 + step)
    tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    return tokens, torch.randn(batch, generator=generator, dtype=torch.float64)


def _norm_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (model(x) - y).pow(2).sum(dim=1)


def _sequence_losses(model: nn.Module, tokens: Tensor, y: Tensor) -> Tensor:
    return (model(tokens) - y).pow(2)


def check_engine_per_sample(
    rank: int,
    world: int,
    sizes: list[int],
    make_model: Callable[[], nn.Module],
    data: Callable[[int, int], tuple[Tensor, Tensor]],
    losses: Callable[[nn.Module, Tensor, Tensor], Tensor],
    make_aggregator: Callable[[], Aggregator],
    *,
    use_ddp: bool,
) -> None:
    batch = sum(sizes)
    torch.manual_seed(0)
    reference = make_model().double()
    torch.manual_seed(0 if use_ddp and rank == 0 else (0 if not use_ddp else 50 + rank))
    model = make_model().double()  # DDP broadcasts rank 0's parameters
    torch.manual_seed(0)
    ref_agg = make_aggregator()  # rank 0's aggregator, which the distributed run must follow
    torch.manual_seed(0 if rank == 0 else 100 + rank)
    agg = make_aggregator()
    wrapped: nn.Module = DistributedDataParallel(model) if use_ddp else model
    group = wrapped if use_ddp else dist.group.WORLD
    opt = JDOptimizer(torch.optim.Adam(wrapped.parameters(), lr=0.02), agg, modules=wrapped,
                      batch_dim=0, process_group=group)  # fmt: skip
    assert isinstance(opt._update_computer, DistributedGramianUpdate)
    ref_opt = JDOptimizer(torch.optim.Adam(reference.parameters(), lr=0.02), ref_agg,
                          modules=reference, batch_dim=0)  # fmt: skip
    for step in range(STEPS):
        x, y = data(step, batch)
        what = f"engine {type(model).__name__} {type(agg).__name__} step {step} (sizes {sizes})"
        record = step_per_sample_against_reference(
            opt, ref_opt, losses, (wrapped, model, reference), x, y, sizes, rank, what
        )
        stats = opt._update_computer.last_stats
        assert stats is not None
        phases = [phase for phase, _, _ in stats.calls]
        assert "factors" in phases and "update" in phases and "jacobian" not in phases, phases
        update_bytes = sum(b for phase, _, b in stats.calls if phase == "update")
        assert update_bytes == record.extras["plain_ddp_bytes"], (update_bytes, record.extras)


def check_routing(rank: int, world: int) -> None:
    """Task losses with modules= take the explicit-Jacobian task path; still exact."""
    torch.manual_seed(0)
    reference = NormMLP().double()
    torch.manual_seed(0)
    model = DistributedDataParallel(NormMLP().double())
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), modules=model,
                      batch_dim=0, process_group=model)  # fmt: skip
    ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), UPGrad())
    sizes = [4] * world
    x, y = _norm_data(0, sum(sizes))

    def tasks(net: nn.Module, xs: Tensor, ys: Tensor) -> list[Tensor]:
        errors = (net(xs) - ys).pow(2)
        return [errors[:, t].mean() for t in range(3)]

    record = opt.step(tasks(model, shard(x, sizes, rank), shard(y, sizes, rank)))
    ref_record = ref_opt.step(tasks(reference, x, y))
    close(record.weights, ref_record.weights, "task losses with modules=: weights")  # type: ignore[arg-type]
    compare_params(model.module, reference, "task losses with modules=")


def check_task_route_resyncs_after_load(rank: int, world: int) -> None:
    """Checkpoints that differ between ranks, loaded after the task route's first step: the next
    task step takes rank 0's aggregator state on every rank again (the computer forgets the sync
    on both of its routes), so the ranks' GradVac states are equal after it."""
    torch.manual_seed(0)
    model = DistributedDataParallel(NormMLP().double())
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), GradVac(beta=0.5),
                      modules=model, batch_dim=0, process_group=model)  # fmt: skip
    sizes = [4] * world
    x, y = _norm_data(0, sum(sizes))
    xs, ys = shard(x, sizes, rank), shard(y, sizes, rank)

    def tasks(net: nn.Module, inputs: Tensor, targets: Tensor) -> list[Tensor]:
        errors = (net(inputs) - targets).pow(2)
        return [errors[:, t].mean() for t in range(3)]

    opt.step(tasks(model, xs, ys))  # the task route takes rank 0's state once
    # Each rank loads a different checkpoint (another run's, on other data): rank 0's must win.
    other = JDOptimizer(torch.optim.SGD(model.module.parameters(), lr=0.0), GradVac(beta=0.5),
                        process_group=False)  # fmt: skip
    other.step(tasks(model.module, *_norm_data(1 + rank, 6)))
    opt.load_state_dict(other.state_dict())
    opt.step(tasks(model, xs, ys))
    states: list[object] = [None] * world
    dist.all_gather_object(states, opt.aggregator.state_dict())
    for other_rank, state in enumerate(states):
        assert _same_state(state, states[0]), f"rank {other_rank}'s GradVac state is not rank 0's"


def _same_state(a: object, b: object) -> bool:
    """Equal state: tensors entry by entry, dicts and sequences item by item."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    return a == b


def run_engine(rank: int, world: int, port: int) -> None:
    init(rank, world, port)
    try:
        unequal = [5, 7] if world == 2 else [3, 4, 6]
        gradvac = lambda: GradVac(beta=0.5)  # noqa: E731  (stateful, seeded)
        for make_agg in (UPGrad, gradvac):
            check_engine_per_sample(
                rank, world, unequal, NormMLP, _norm_data, _norm_losses, make_agg, use_ddp=True
            )
        check_engine_per_sample(rank, world, unequal, SequenceModel, _sequence_data,
                                _sequence_losses, PCGrad, use_ddp=True)  # fmt: skip
        check_engine_per_sample(rank, world, [4] * world, SequenceModel, _sequence_data,
                                _sequence_losses, UPGrad, use_ddp=False)  # fmt: skip
        check_routing(rank, world)
        check_task_route_resyncs_after_load(rank, world)
    finally:
        dist.destroy_process_group()
    _leave_without_teardown()
