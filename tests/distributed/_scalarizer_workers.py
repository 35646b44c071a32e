"""Code run inside the spawned gloo processes of ``test_distributed_scalarizer.py``.

A scalarizer's step takes its gradient with ``torch.autograd.grad``, which a
``DistributedDataParallel`` model does not all-reduce; so a ``JDOptimizer(opt, scalarizer)`` on a
DDP model's parameters is refused at the first step (nothing changes), ``process_group=False``
steps each process alone on purpose, and the documented way to scalarize under DDP (scalarize,
``backward()``, the plain optimizer's step) keeps the replicas equal. Each check compares with an
independent single-process computation run in the same process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

import jdoptim.scalarization as S
from jdoptim import JDOptimizer
from tests._snapshots import assert_unchanged, snapshot
from tests.distributed._workers import (
    GLOBAL_BATCH,
    _leave_without_teardown,
    close,
    compare_params,
    global_data,
    init,
    make_model,
    shard,
)
from tests.models import task_losses


def _my_shard(step: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    sizes = [GLOBAL_BATCH // world] * world
    x, y = global_data(step)
    return shard(x, sizes, rank), shard(y, sizes, rank)


def check_refused(rank: int, world: int) -> None:
    """UW (learnable log-variances, added to the optimizer as a group) on a DDP model: the first
    step is refused with an error that names the problem and both ways out; parameters, .grad,
    the optimizer's state and UW's parameters are unchanged."""
    model = make_model()
    ddp = DistributedDataParallel(model)
    uw = S.UW(3).double()
    opt = JDOptimizer(torch.optim.Adam(ddp.parameters(), lr=0.01), uw)
    before, uw_before = snapshot(model, opt), [p.detach().clone() for p in uw.parameters()]
    x, y = _my_shard(0, rank, world)
    try:
        opt.step(task_losses(ddp, x, y))  # type: ignore[arg-type]
    except ValueError as error:
        text = str(error)
        assert "DistributedDataParallel" in text and "scalarizer" in text, text
        assert "backward()" in text and "process_group=False" in text, text
    else:
        raise AssertionError("a scalarizer step on a DDP model must be refused")
    assert_unchanged(model, opt, before)
    for now, then in zip(uw.parameters(), uw_before):
        assert torch.equal(now.detach(), then), "the refused step changed UW's parameters"


def check_alone_on_purpose(rank: int, world: int) -> None:
    """process_group=False: each process steps alone on its shard, exactly as a JDOptimizer on a
    plain (not DDP) copy of the model does on that shard; the replicas then differ."""
    model, reference = make_model(), make_model()
    ddp = DistributedDataParallel(model)
    opt = JDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), S.Mean(), process_group=False)
    ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), S.Mean())
    for step in range(2):
        x, y = _my_shard(step, rank, world)
        opt.zero_grad()
        opt.step(task_losses(ddp, x, y))  # type: ignore[arg-type]
        ref_opt.zero_grad()
        ref_opt.step(task_losses(reference, x, y))
        compare_params(model, reference, f"process_group=False, step {step}")
    first = next(model.parameters()).detach().clone()
    gathered = [torch.empty_like(first) for _ in range(world)]
    dist.all_gather(gathered, first)
    assert not torch.allclose(gathered[0], gathered[1]), "different shards, same replicas?"


def check_documented_ddp_way(rank: int, world: int) -> None:
    """Scalarize, backward() and step the plain optimizer under DDP: the averaged gradient of
    equal shards' mean losses is the global batch's, so every replica equals a single-process
    JDOptimizer(SGD, Mean()) step on the whole batch."""
    model, reference = make_model(), make_model()
    ddp = DistributedDataParallel(model)
    sgd = torch.optim.SGD(ddp.parameters(), lr=0.1)
    mean = S.Mean()
    ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), S.Mean())
    for step in range(2):
        x, y = _my_shard(step, rank, world)
        sgd.zero_grad()
        mean(torch.stack(task_losses(ddp, x, y))).backward()  # type: ignore[arg-type]
        sgd.step()
        ref_opt.zero_grad()
        ref_opt.step(task_losses(reference, *global_data(step)))
        compare_params(model, reference, f"DDP + backward of the scalarized loss, step {step}")
    for param in model.parameters():
        gathered = [torch.empty_like(param) for _ in range(world)]
        dist.all_gather(gathered, param.detach().contiguous())
        close(gathered[0], gathered[1], "replicas after the DDP steps")


def run_scalarizer_checks(rank: int, world: int, port: int) -> None:
    init(rank, world, port)
    try:
        check_refused(rank, world)
        check_alone_on_purpose(rank, world)
        check_documented_ddp_way(rank, world)
    finally:
        dist.destroy_process_group()
    _leave_without_teardown()  # (torch 2.13's gloo aborts a few percent of exits: see there)


__all__ = ["run_scalarizer_checks"]
