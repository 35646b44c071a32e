"""A scalarizer (``JDOptimizer(opt, UW(3))``) on a ``DistributedDataParallel`` model, on 2 gloo
processes: refused at the first step with nothing changed, ``process_group=False`` steps each
process alone (equal to a single-process step on its shard), and the documented DDP way
(scalarize, ``backward()``, plain step) equals a single-process step on the global batch
(see ``_scalarizer_workers.py``)."""

from __future__ import annotations

import socket

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from . import _scalarizer_workers

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_scalarizer_with_ddp_on_two_processes() -> None:
    mp.spawn(_scalarizer_workers.run_scalarizer_checks, args=(2, _free_port()), nprocs=2)
