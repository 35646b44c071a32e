"""Code run inside the spawned gloo processes of the distributed tests.

Every check compares the distributed step with an independent single-process computation: a plain
``JDOptimizer`` (no process group) on the whole global batch, run in the same process. Failures
raise, and ``torch.multiprocessing.spawn`` re-raises them in the test.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDOptimizer, StepRecord, UPGrad
from jdoptim.aggregation import Aggregator, GradDrop, GradVac, PCGrad, TrimmedMean
from jdoptim.distributed import DistributedStepError, broadcast_parameters
from tests.models import MultiTaskMLP, task_losses

GLOBAL_BATCH = 12  # divisible by 2 and 3: equal shards for task losses
STEPS = 3
RTOL, ATOL = 1e-9, 1e-11


def init(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
    )


def global_data(step: int, n: int = GLOBAL_BATCH) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(n, 6, generator=generator, dtype=torch.float64)
    y = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    return x, y


def shard(tensor: Tensor, sizes: list[int], rank: int) -> Tensor:
    return tensor.split(sizes)[rank]


def make_model(seed: int = 0, dtype: torch.dtype = torch.float64) -> MultiTaskMLP:
    torch.manual_seed(seed)
    return MultiTaskMLP(n_tasks=3).to(dtype)


def close(a: Tensor, b: Tensor, what: str) -> None:
    if a.dtype == torch.float32 or b.dtype == torch.float32:  # float32 sums in another order
        rtol, atol = 1e-4, 1e-6
    else:
        rtol, atol = RTOL, ATOL
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def compare_params(model: nn.Module, reference: nn.Module, what: str) -> None:
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        close(p.detach(), q.detach(), f"{what}, parameter {name}")


# -- scenarios -----------------------------------------------------------------------------


def step_per_sample_against_reference(
    opt: JDOptimizer,
    ref_opt: JDOptimizer,
    losses: Callable[[nn.Module, Tensor, Tensor], Tensor],
    models: tuple[nn.Module, nn.Module, nn.Module],
    x: Tensor,
    y: Tensor,
    sizes: list[int],
    rank: int,
    what: str,
) -> StepRecord:
    """One distributed step on this rank's shard of the global batch ``(x, y)`` and one step of
    the single-process reference on all of it; their Gramians, per-sample weights and parameters
    must agree. ``models`` is ``(wrapped, model, reference)``: the (possibly DDP-wrapped) model
    the losses go through, its underlying module, and the reference."""
    wrapped, model, reference = models
    opt.zero_grad()
    record = opt.step(losses(wrapped, shard(x, sizes, rank), shard(y, sizes, rank)))
    ref_opt.zero_grad()
    ref_record = ref_opt.step(losses(reference, x, y))
    assert record.weights is not None and record.weights.shape == (x.shape[0],)
    close(record.gramian, ref_record.gramian, f"{what}: Gramian")  # type: ignore[arg-type]
    close(record.weights, ref_record.weights, f"{what}: weights")  # type: ignore[arg-type]
    compare_params(model, reference, what)
    return record


def check_task_losses(
    rank: int,
    world: int,
    make_aggregator: Callable[[], Aggregator],
    *,
    use_ddp: bool,
    adam: bool,
    steps: int = STEPS,
    dtype: torch.dtype = torch.float64,
) -> None:
    """Task losses (each a mean over the local shard) vs one process on the global batch."""
    reference = make_model(dtype=dtype)
    torch.manual_seed(0)
    ref_agg = make_aggregator()  # rank 0's aggregator: the distributed run must follow it
    torch.manual_seed(0 if rank == 0 else 100 + rank)  # other ranks' start elsewhere
    agg = make_aggregator()
    model = make_model(seed=rank if use_ddp else 0, dtype=dtype)  # DDP broadcasts rank 0's
    wrapped: nn.Module = DistributedDataParallel(model) if use_ddp else model

    def make_opt(params) -> torch.optim.Optimizer:  # type: ignore[no-untyped-def]
        return torch.optim.Adam(params, lr=0.01) if adam else torch.optim.SGD(params, lr=0.1)

    group = wrapped if use_ddp else dist.group.WORLD
    opt = JDOptimizer(make_opt(wrapped.parameters()), agg, process_group=group)
    ref_opt = JDOptimizer(make_opt(reference.parameters()), ref_agg)
    sizes = [GLOBAL_BATCH // world] * world
    for step in range(steps):
        x, y = (t.to(dtype) for t in global_data(step))
        opt.zero_grad()
        record = opt.step(task_losses(wrapped, shard(x, sizes, rank), shard(y, sizes, rank)))  # type: ignore[arg-type]
        ref_opt.zero_grad()
        ref_record = ref_opt.step(task_losses(reference, x, y))
        what = f"{type(agg).__name__} step {step} (world {world}, ddp={use_ddp})"
        if ref_record.weights is not None:
            assert record.weights is not None
            close(record.weights, ref_record.weights, f"{what}: weights")
            close(record.gramian, ref_record.gramian, f"{what}: Gramian")  # type: ignore[arg-type]
        compare_params(model, reference, what)
        check_communication(record, world, what)


def _ring(nbytes: float, world: int) -> int:
    """Bytes one process sends in a ring all-reduce of ``nbytes``: ``2 S (N-1)/N``."""
    return round(2 * nbytes * (world - 1) / world)


def expected_task_bytes(record: StepRecord, world: int) -> int:
    """The bytes one process sends in a Gramian-weighted task-loss step, derived by hand from
    the algorithm of ``jdoptim.distributed.update`` (module docstring) and the cost model of
    ``_comm`` (all-reduce ``2 S (N-1)/N``, all-gather ``S (N-1)``, broadcast ``S (N-1)/N``):
    agreement flags, the signature, the reduce-scatter of ``Jᵀ`` by column slices of ``c``
    entries, the Gramian and specific gradients, rank 0's weights, the update slices."""
    m = len(record.names)
    element = record.shared[0].element_size()
    n_shared = sum(p.numel() for p in record.shared)
    n_specific = sum(p.numel() for p, _ in record.specific)
    c = -(-n_shared // world)  # ceil
    flags = (1 + world) * torch.empty((), dtype=torch.get_default_dtype()).element_size()
    return (
        _ring(flags, world)  # agree
        + round(6 * 8 * (world - 1))  # signature (float64) all-gather
        + round(c * m * element * (world - 1))  # all-to-all of J's column slices
        + _ring((m * m + n_specific) * element, world)  # partial Gramians, specific grads
        + round(m * element * (world - 1) / world)  # rank 0's weights
        + round(c * element * (world - 1))  # all-gather of the update slices
    )


def check_communication(record: StepRecord, world: int, what: str) -> None:
    """The step's typed statistics: the hand-derived bytes, the plain-DDP bytes of the reached
    parameters, the collectives, and the compatibility entries of ``record.extras``."""
    stats = record.communication
    assert stats is not None, f"{what}: a distributed step must record its communication"
    element = record.shared[0].element_size()
    numel = sum(p.numel() for p in record.shared) + sum(p.numel() for p, _ in record.specific)
    assert stats.world_size == world
    assert stats.plain_ddp_bytes == _ring(numel * element, world), (what, stats)
    assert stats.bytes_sent == sum(nbytes for _, _, nbytes in stats.calls) > 0
    if record.weights is not None:  # Gramian-weighted: reduce-scatter, Gramian, all-gather
        assert stats.bytes_sent == expected_task_bytes(record, world), (what, stats)
        assert stats.all_gathers == 2 and stats.count("all_to_all") == 1, (what, stats.calls)
        assert stats.ratio_to_ddp == stats.bytes_sent / stats.plain_ddp_bytes
    for key in ("bytes_sent", "plain_ddp_bytes", "world_size"):  # kept for compatibility
        assert record.extras[key] == getattr(stats, key), (what, key)


def check_grad_scaler(rank: int, world: int) -> None:
    """A GradScaler wraps the distributed computer as it wraps a local one: the scaled step of
    the shards equals the unscaled single-process step on the whole batch (float64, where the
    scale is exact), and an overflow (float32, scale 3e38) skips the step on every process
    with nothing changed and the scale lowered."""
    model, reference = make_model(), make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), process_group=True)
    ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1))
    sizes = [GLOBAL_BATCH // world] * world
    for step in range(2):
        x, y = global_data(step)
        opt.zero_grad()
        record = opt.step(task_losses(model, shard(x, sizes, rank), shard(y, sizes, rank)),
                          grad_scaler=scaler)  # fmt: skip
        scaler.update()
        ref_opt.zero_grad()
        ref_record = ref_opt.step(task_losses(reference, x, y))
        what = f"GradScaler step {step} (world {world})"
        assert not record.skipped, what
        close(record.gramian, ref_record.gramian, f"{what}: unscaled Gramian")  # type: ignore[arg-type]
        close(record.weights, ref_record.weights, f"{what}: weights")  # type: ignore[arg-type]
        compare_params(model, reference, what)

    small = make_model(dtype=torch.float32)
    before = [p.detach().clone() for p in small.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=1e-30)
    opt = JDOptimizer(torch.optim.SGD(small.parameters(), lr=0.1), process_group=True)
    x, y = (t.float() for t in global_data(0))
    record = opt.step(task_losses(small, shard(x, sizes, rank), shard(y, sizes, rank)),
                      grad_scaler=scaler)  # fmt: skip
    scaler.update()
    assert record.skipped and record.reason.startswith("GradScaler skipped the step"), record
    assert all(torch.equal(p, q) for p, q in zip(small.parameters(), before))
    assert scaler.get_scale() < 3e38


def check_per_sample(rank: int, world: int, sizes: list[int], *, use_ddp: bool) -> None:
    """Per-sample losses: the global Gramian, cross-process blocks included, over steps."""
    batch = sum(sizes)
    reference = make_model()
    model = make_model()
    wrapped: nn.Module = DistributedDataParallel(model) if use_ddp else model
    group = wrapped if use_ddp else True
    opt = JDOptimizer(torch.optim.SGD(wrapped.parameters(), lr=0.05), UPGrad(), batch_dim=0,
                      process_group=group)  # fmt: skip
    ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.05), UPGrad())

    def per_sample(net: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        outs = torch.stack(net(x), dim=1)
        return (outs - y).pow(2).sum(dim=1)

    for step in range(STEPS):
        x, y = global_data(step, batch)
        step_per_sample_against_reference(
            opt, ref_opt, per_sample, (wrapped, model, reference), x, y, sizes, rank,
            f"per-sample step {step} (sizes {sizes})",
        )  # fmt: skip


def check_agreement(rank: int, world: int) -> None:
    """Non-finite losses on one process: every process skips; mismatched steps raise."""
    model = make_model()
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), process_group=True, nonfinite="skip"
    )
    before = [p.detach().clone() for p in model.parameters()]
    x, y = global_data(0, 2 * world)
    losses = task_losses(model, x[2 * rank : 2 * rank + 2], y[2 * rank : 2 * rank + 2])
    if rank == world - 1:
        losses[0] = losses[0] * float("nan")
    record = opt.step(losses)
    assert record.skipped, "every process must skip when one has a non-finite loss"
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    losses = task_losses(model, x, y)
    try:
        opt.step(losses if rank == 0 else losses[:2])
    except ValueError as error:
        assert "disagree" in str(error)
    else:
        raise AssertionError("a mismatched number of losses must raise on every process")

    # Parameters that differ between processes are refused, and broadcast_parameters fixes it.
    torch.manual_seed(rank)
    other = MultiTaskMLP(n_tasks=3).double()
    opt = JDOptimizer(torch.optim.SGD(other.parameters(), lr=0.1), process_group=True)
    try:
        opt.step(task_losses(other, x, y))
    except ValueError as error:
        assert "differ between processes" in str(error)
    else:
        raise AssertionError("diverged replicas must be refused")
    broadcast_parameters(other)
    opt.step(task_losses(other, x, y))


def save_checkpoint(rank: int, world: int, path: str, steps: int) -> None:
    """Train ``steps`` steps with GradVac (stateful) and save on rank 0."""
    model = DistributedDataParallel(make_model())
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), GradVac(beta=0.5, seed=7),
                      process_group=model)  # fmt: skip
    sizes = [GLOBAL_BATCH // world] * world
    for step in range(steps):
        x, y = global_data(step)
        opt.zero_grad()
        opt.step(task_losses(model, shard(x, sizes, rank), shard(y, sizes, rank)))  # type: ignore[arg-type]
    if rank == 0:
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict()}, path)
    dist.barrier()


def resume_checkpoint(rank: int, world: int, path: str, done: int, more: int) -> None:
    """Resume a checkpoint saved on another number of processes; compare with one process
    running ``done + more`` steps without interruption."""
    reference = make_model()
    ref_agg = GradVac(beta=0.5, seed=7)
    ref_opt = JDOptimizer(torch.optim.Adam(reference.parameters(), lr=0.01), ref_agg)
    for step in range(done):
        x, y = global_data(step)
        ref_opt.zero_grad()
        ref_opt.step(task_losses(reference, x, y))

    checkpoint = torch.load(path, weights_only=False)
    net = make_model(seed=rank)
    net.load_state_dict(checkpoint["model"])
    model = DistributedDataParallel(net)
    # A different GradVac seed on each process: the checkpoint must override it.
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), GradVac(beta=0.5, seed=rank),
                      process_group=model)  # fmt: skip
    opt.load_state_dict(checkpoint["opt"])
    sizes = [GLOBAL_BATCH // world] * world
    for step in range(done, done + more):
        x, y = global_data(step)
        opt.zero_grad()
        record = opt.step(task_losses(model, shard(x, sizes, rank), shard(y, sizes, rank)))  # type: ignore[arg-type]
        ref_opt.zero_grad()
        ref_record = ref_opt.step(task_losses(reference, x, y))
        close(record.weights, ref_record.weights, f"resumed step {step}: weights")  # type: ignore[arg-type]
        compare_params(net, reference, f"resumed step {step} on {world} processes")


# -- entry points for torch.multiprocessing.spawn ---------------------------------------------


class _SparseTowers(nn.Module):
    """Two task towers on a sparse embedding table (``sparse=True``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.items = nn.Embedding(20, 4, sparse=True)
        self.towers = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.towers(self.items(ids).mean(1))


def check_sparse_embedding(rank: int, world: int) -> None:
    """A sparse embedding's Jacobian blocks differ in their looked-up rows between processes:
    the distributed step makes them dense, and equals one process on the global batch."""
    model, reference = _SparseTowers().double(), _SparseTowers().double()
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), process_group=dist.group.WORLD
    )
    ref_opt = JDOptimizer(torch.optim.SGD(reference.parameters(), lr=0.1), UPGrad())
    sizes = [GLOBAL_BATCH // world] * world
    for step in range(2):
        ids = torch.randint(0, 20, (GLOBAL_BATCH, 3), generator=torch.Generator().manual_seed(step))
        _, y = global_data(step)
        opt.zero_grad()
        out = model(shard(ids, sizes, rank))
        record = opt.step(list((out - shard(y, sizes, rank)).pow(2).mean(0)))
        ref_opt.zero_grad()
        ref_record = ref_opt.step(list((reference(ids) - y).pow(2).mean(0)))
        what = f"sparse embedding step {step} (world {world})"
        close(record.gramian, ref_record.gramian, f"{what}: Gramian")  # type: ignore[arg-type]
        compare_params(model, reference, what)


def run_exactness(rank: int, world: int, port: int, checkpoint: str | None, mode: str) -> None:
    init(rank, world, port)
    try:
        check_task_losses(rank, world, UPGrad, use_ddp=True, adam=False)
        check_task_losses(rank, world, UPGrad, use_ddp=False, adam=True)
        check_task_losses(rank, world, UPGrad, use_ddp=True, adam=True, dtype=torch.float32)
        check_task_losses(rank, world, lambda: GradVac(beta=0.5), use_ddp=True, adam=True)
        check_task_losses(rank, world, PCGrad, use_ddp=False, adam=False)
        check_task_losses(rank, world, GradDrop, use_ddp=True, adam=False)
        check_task_losses(rank, world, lambda: TrimmedMean(1), use_ddp=False, adam=False)
        unequal = [5, 7] if world == 2 else [3, 4, 6]
        check_per_sample(rank, world, unequal, use_ddp=True)
        check_per_sample(rank, world, [4] * world, use_ddp=False)
        check_agreement(rank, world)
        check_grad_scaler(rank, world)
        check_sparse_embedding(rank, world)
        if checkpoint is not None and mode == "save":
            save_checkpoint(rank, world, checkpoint, steps=2)
        if checkpoint is not None and mode == "resume":
            resume_checkpoint(rank, world, checkpoint, done=2, more=2)
    finally:
        dist.destroy_process_group()
    _leave_without_teardown()


def _leave_without_teardown() -> None:
    """Exit a worker that passed every check, skipping the interpreter's teardown.

    torch 2.13's gloo aborts a few percent of processes at exit ("terminate called without an
    active exception", SIGABRT), plain DDP scripts without jdoptim included (measured here: 1 run
    in 25); spawn would report that as a failure of a test whose checks all passed.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _record_failing_step(rank: int, world: int, port: int, timeout_s: float, result: str) -> None:
    """Rank 0 steps and writes how long it took to get a DistributedStepError, and its text."""
    init(rank, world, port, timeout_s=timeout_s)
    from tests._snapshots import assert_unchanged, snapshot

    model = make_model()
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), GradVac(seed=1),
                      process_group=True)  # fmt: skip
    x, y = global_data(0)
    before = snapshot(model, opt)
    start = time.monotonic()
    try:
        opt.step(task_losses(model, x, y))
    except DistributedStepError as error:
        assert_unchanged(model, opt, before)  # parameters, .grad, Adam's and GradVac's state
        with open(result, "w") as file:
            file.write(f"{time.monotonic() - start:.2f}\n{error}")


def run_hang(rank: int, world: int, port: int, result: str) -> None:
    """Rank 1 never calls step(): rank 0 must get a DistributedStepError, not hang."""
    if rank == 0:
        _record_failing_step(rank, world, port, 3.0, result)
    else:
        init(rank, world, port, timeout_s=3.0)
        JDOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), process_group=True)
        time.sleep(8.0)  # "stuck" well past the 3 s timeout, then leaves without a step
    # After a timed-out collective the group is unusable, and gloo's threads may abort at
    # interpreter teardown ("terminate called without an active exception"): leave at once.
    _leave_without_teardown()


def run_crash(rank: int, world: int, port: int, result: str) -> None:
    """Rank 1 dies mid-run: rank 0 must get a DistributedStepError at once, not at the
    (60 s) timeout."""
    if rank == 0:
        _record_failing_step(rank, world, port, 60.0, result)
        _leave_without_teardown()  # its peer is gone: gloo may abort at teardown
    else:
        init(rank, world, port, timeout_s=60.0)
        JDOptimizer(torch.optim.SGD(make_model().parameters(), lr=0.1), process_group=True)
        time.sleep(0.5)
        os._exit(0)  # no clean shutdown: as if killed
