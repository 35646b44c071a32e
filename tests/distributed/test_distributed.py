"""Distributed JD on gloo/CPU: N processes with shards vs one process on the whole batch.

One spawn per world size runs all the exactness checks (see ``_workers.py``): task losses with
UPGrad (DDP-wrapped and plain model + process group, SGD and Adam), GradVac (stateful, EMA and
seeded order), PCGrad (randomised, differently seeded per process), GradDrop (randomised,
non-Gramian) and TrimmedMean (non-Gramian); per-sample losses with equal and unequal shards; all
processes skipping together on a non-finite loss; mismatched steps and diverged replicas refused;
the typed communication statistics against the bytes derived by hand; a GradScaler around the
distributed computer (the scaled step equals the unscaled one; an overflow skips everywhere); a
sparse embedding table (its blocks made dense);
a checkpoint saved on rank 0 of 2 processes resumed on 3. Also: a stuck process and a crashed
one give a DistributedStepError instead of a hang, with every state unchanged (``_workers.py``);
a local error on one rank fails every rank's step and keeps them in lockstep, mismatched numbers
of losses, and a DDP model without ``process_group`` (``_fault_workers.py``). And
(``_engine_workers.py``) the Gramian engine with ``modules=`` on per-sample losses (factor
exchange), unequal shards, Linear + LayerNorm, Embedding, Conv1d and a fallback module, UPGrad,
GradVac and PCGrad, against a single-process engine run on the global batch; task losses with
``modules=`` routed to the explicit path.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from . import _engine_workers, _workers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ddp") / "rank0.pt"


def test_exact_on_two_processes_and_checkpoint(checkpoint: Path) -> None:
    mp.spawn(_workers.run_exactness, args=(2, _free_port(), str(checkpoint), "save"), nprocs=2)
    assert checkpoint.exists()


def test_exact_on_three_processes_and_resume(checkpoint: Path) -> None:
    if not checkpoint.exists():  # run alone: make the 2-process checkpoint first
        mp.spawn(_workers.run_exactness, args=(2, _free_port(), str(checkpoint), "save"), nprocs=2)
    mp.spawn(_workers.run_exactness, args=(3, _free_port(), str(checkpoint), "resume"), nprocs=3)


def test_a_stuck_process_gives_an_error_not_a_hang(tmp_path: Path) -> None:
    result = tmp_path / "error.txt"
    mp.spawn(_workers.run_hang, args=(2, _free_port(), str(result)), nprocs=2)
    elapsed, message = result.read_text().split("\n", 1)
    assert float(elapsed) < 7.0
    assert "rank 0 of 2" in message and "did not call step()" in message


def test_a_crashed_process_gives_an_error_at_once(tmp_path: Path) -> None:
    result = tmp_path / "error.txt"
    mp.spawn(_workers.run_crash, args=(2, _free_port(), str(result)), nprocs=2)
    elapsed, message = result.read_text().split("\n", 1)
    assert float(elapsed) < 30.0  # well under the 60 s timeout
    assert "Nothing was updated" in message


@pytest.mark.parametrize("world", [2, 3])
def test_engine_per_sample_exact(world: int) -> None:
    """modules= + process_group=: per-sample losses by the factor exchange, unequal shards."""
    mp.spawn(_engine_workers.run_engine, args=(world, _free_port()), nprocs=world)


def test_a_local_error_on_one_rank_fails_every_rank_and_keeps_them_in_lockstep() -> None:
    """A bad input on one rank (a Python float among the losses, an empty per-sample shard,
    losses already backpropagated), caught by every rank's loop: every rank fails that step,
    nothing changes, and the following steps equal a single-process run without that step.
    Also: mismatched numbers of losses, and a DDP model stepped without process_group."""
    from . import _fault_workers

    mp.spawn(_fault_workers.run_faults, args=(2, _free_port()), nprocs=2)


def test_engine_exchanges_kernel_factors_of_every_linear_like_rule() -> None:
    """transformers' Conv1D and a user LinearLikeRule with a transposed weight gather their
    kernel factors (not their rows), a depthwise Conv1d its rows; the Gramian equals the
    explicit Jacobian's on the global batch, on unequal shards (``_exchange_workers.py``)."""
    pytest.importorskip("transformers")
    from . import _exchange_workers

    mp.spawn(_exchange_workers.run_exchange, args=(2, _free_port()), nprocs=2)
