"""Distributed faults, run inside spawned gloo processes (short process-group timeout).

Each scenario makes one rank fail a step in some way while every rank's training loop catches
the error and goes on. Checked on every surviving rank: it raises at the same step, nothing
changed (parameters, ``.grad``, optimizer and aggregator state, bit for bit), and the next steps
equal those of a single-process reference that never saw the failed step (so the ranks stayed in
lockstep and identical).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDOptimizer
from jdoptim.aggregation import GradVac
from jdoptim.distributed import DistributedStepError
from tests._snapshots import assert_unchanged, snapshot
from tests.distributed._workers import (
    _leave_without_teardown,
    compare_params,
    global_data,
    init,
    make_model,
    shard,
)
from tests.models import task_losses

FAILING_STEP = 1
STEPS = 4


def _per_sample(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return (torch.stack(net(x), dim=1) - y).pow(2).sum(dim=1)


def _faulty_losses(kind: str, net: nn.Module, x: Tensor, y: Tensor) -> object:
    """This rank's bad input at the failing step."""
    if kind == "python float":
        losses: list[object] = list(task_losses(net, x, y))  # type: ignore[arg-type]
        losses[1] = float(losses[1].item())  # type: ignore[union-attr]
        return losses
    if kind == "empty shard":
        return _per_sample(net, x[:0], y[:0])
    if kind == "backward first":  # fails in the local backward, after the input checks
        losses = list(task_losses(net, x, y))  # type: ignore[arg-type]
        sum(losses).backward()  # type: ignore[union-attr, arg-type]
        return losses
    raise ValueError(kind)


def check_local_error(rank: int, world: int, kind: str, engine: bool) -> None:
    """Rank ``world - 1`` gives a bad input at step ``FAILING_STEP``; its loop catches it."""
    per_sample = kind == "empty shard"
    reference, model = make_model(), make_model()
    # A backward() on one rank alone would make DDP's reducer run collectives there alone (its
    # bucket rebuild at the next forward): that case runs on a plain model and process group.
    ddp: nn.Module = model if kind == "backward first" else DistributedDataParallel(model)
    group = ddp if isinstance(ddp, DistributedDataParallel) else True
    kwargs = {"batch_dim": 0} if per_sample else {}
    opt = JDOptimizer(torch.optim.Adam(ddp.parameters(), lr=0.01), GradVac(beta=0.5, seed=3),
                      modules=model if engine else None, process_group=group, **kwargs)  # fmt: skip
    ref_opt = JDOptimizer(torch.optim.Adam(reference.parameters(), lr=0.01),
                          GradVac(beta=0.5, seed=3))  # fmt: skip
    losses_of: Callable = _per_sample if per_sample else task_losses  # type: ignore[type-arg]
    sizes = [12 // world] * world
    for step in range(STEPS):
        x, y = global_data(step)
        mine = shard(x, sizes, rank), shard(y, sizes, rank)
        opt.zero_grad()
        if step == FAILING_STEP:
            failing = rank == world - 1
            losses = _faulty_losses(kind, ddp, *mine) if failing else losses_of(ddp, *mine)
            before = snapshot(model, opt)  # after the faulty input's own backward, if any
            try:
                opt.step(losses)
            except DistributedStepError as error:
                assert not failing, f"the failing rank got another process's error: {error}"
                assert f"rank(s) {world - 1}" in str(error)
            except (TypeError, ValueError, RuntimeError) as error:
                assert failing, f"rank {rank} raised its own error: {error}"
            else:
                raise AssertionError(f"rank {rank} did not fail step {step} ({kind})")
            assert_unchanged(model, opt, before)
            continue
        opt.step(losses_of(ddp, *mine))
        ref_opt.zero_grad()
        ref_opt.step(losses_of(reference, x, y))
        compare_params(model, reference, f"{kind}, engine={engine}, step {step} (after a failure)")


def check_mismatched_losses(rank: int, world: int) -> None:
    """Rank 0 passes 3 task losses, the others 2: every rank refuses, nothing changes, and
    the next step works."""
    model = make_model()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), GradVac(seed=1),
                      process_group=True)  # fmt: skip
    x, y = global_data(0)
    before = snapshot(model, opt)
    losses = task_losses(model, x, y)
    try:
        opt.step(losses if rank == 0 else losses[:2])
    except ValueError as error:
        assert "disagree" in str(error)
    else:
        raise AssertionError("a mismatched number of losses must raise on every process")
    assert_unchanged(model, opt, before)
    opt.step(task_losses(model, x, y))


def check_ddp_without_process_group(rank: int, world: int) -> None:
    """A DDP model stepped by a JDOptimizer without process_group is refused at the first
    step (the replicas would drift apart); process_group=False opts out, on purpose."""
    model = make_model()
    ddp = DistributedDataParallel(model)
    x, y = global_data(0)
    opt = JDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1))
    before = snapshot(model, opt)
    try:
        opt.step(task_losses(ddp, x, y))  # type: ignore[arg-type]
    except ValueError as error:
        assert "process_group=ddp_model" in str(error) and "process_group=False" in str(error)
    else:
        raise AssertionError("a DDP model without process_group must be refused")
    assert_unchanged(model, opt, before)
    alone = JDOptimizer(torch.optim.SGD(ddp.parameters(), lr=0.1), process_group=False)
    alone.step(task_losses(ddp, x, y))  # type: ignore[arg-type]
    plain = make_model()  # not wrapped in DDP: no refusal
    JDOptimizer(torch.optim.SGD(plain.parameters(), lr=0.1)).step(task_losses(plain, x, y))


def run_faults(rank: int, world: int, port: int) -> None:
    init(rank, world, port, timeout_s=20.0)
    try:
        for kind, engine in (
            ("python float", False),
            ("backward first", False),
            ("empty shard", False),
            ("empty shard", True),
        ):
            check_local_error(rank, world, kind, engine)
        check_mismatched_losses(rank, world)
        check_ddp_without_process_group(rank, world)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _leave_without_teardown()
