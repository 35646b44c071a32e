"""Bytes sent and time of a distributed JD step vs a plain DDP step (gloo, CPU, localhost).

For each configuration, ``N`` processes train the same DDP-wrapped model on their shards, and
each process measures, for a plain DDP step (``sum(losses).backward(); opt.step()``) and a JD
step (``opt.step(losses)``) alternately:

* **measured bytes**: the growth of ``wchar`` in ``/proc/self/io`` over the step (gloo writes
  its TCP payloads with ``write``; nothing else is written during a step), averaged over ranks;
* **accounted bytes**: what :class:`jdoptim.distributed.CommStats` counts for the step, and the
  plain-DDP figure ``2 n (N-1)/N`` elements of the same cost model;
* **time**: median over the steps of the JD step divided by the median of the plain step.

Per-sample losses run on the explicit-Jacobian path and on the Gramian engine
(``modules=model``: factor exchange, then one gradient all-reduce).

Run: ``python benchmarks/bench_distributed.py`` (about a minute on 2 cores); it prints a
Markdown table for ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jdoptim import JDOptimizer, UPGrad

D_IN, HIDDEN = 64, 256
STEPS = 6


class Trunk(nn.Module):
    """A 64-256-256 trunk with ``m`` linear heads (about 83k shared parameters)."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(D_IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU()
        )
        self.heads = nn.Linear(HIDDEN, m)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.trunk(x))


def _wchar() -> int:
    with open("/proc/self/io") as file:
        for line in file:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def _measure(kind: str, m: int, local_batch: int) -> tuple:
    """One configuration on this process: medians of bytes and times, plain vs JD."""
    torch.manual_seed(0)
    plain_model = DistributedDataParallel(Trunk(m))
    jd_model = DistributedDataParallel(Trunk(m))
    plain = torch.optim.SGD(plain_model.parameters(), lr=1e-3)
    per_sample = kind in ("per-sample", "engine")
    jd = JDOptimizer(
        torch.optim.SGD(jd_model.parameters(), lr=1e-3),
        UPGrad(),
        modules=jd_model if kind == "engine" else None,
        process_group=jd_model,
        batch_dim=0 if per_sample else None,
    )
    x = torch.randn(local_batch, D_IN)
    y = torch.randn(local_batch, m)

    def losses(model: nn.Module) -> Tensor:
        errors = (model(x) - y).pow(2)
        return errors.sum(dim=1) if per_sample else errors.mean(dim=0)

    def plain_step() -> dict:
        plain.zero_grad()
        losses(plain_model).sum().backward()
        plain.step()
        return {}

    def jd_step() -> dict:
        jd.zero_grad()
        return jd.step(losses(jd_model)).extras

    plain_step(), jd_step()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "jd": []}
    sent: dict[str, list[int]] = {"plain": [], "jd": []}
    extras: dict = {}
    for _ in range(STEPS):
        for name, step in (("plain", plain_step), ("jd", jd_step)):
            dist.barrier()
            before, start = _wchar(), time.perf_counter()
            result = step()
            times[name].append(time.perf_counter() - start)
            sent[name].append(_wchar() - before)
            extras = result or extras
    n = sum(p.numel() for p in jd_model.parameters())
    return (
        kind,
        m,
        local_batch,
        n,
        statistics.median(sent["plain"]),
        statistics.median(sent["jd"]),
        extras["plain_ddp_bytes"],
        extras["bytes_sent"],
        statistics.median(times["jd"]) / statistics.median(times["plain"]),
    )


def _worker(rank: int, world: int, port: int, configs: list, out: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    lines = [_measure(*config) for config in configs]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, lines)
    if rank == 0:
        rows = []
        for columns in zip(*gathered):
            first = columns[0]
            mean_plain = sum(c[4] for c in columns) / world
            mean_jd = sum(c[5] for c in columns) / world
            mean_time = sum(c[8] for c in columns) / world
            rows.append((*first[:4], mean_plain, mean_jd, first[6], first[7], mean_time))
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    configs = [("task", m, 32) for m in (2, 4, 8)]
    configs += [(kind, 1, b) for kind in ("per-sample", "engine") for b in (4, 16, 64)]
    print(
        "| N | losses | local batch | params n | plain DDP, measured | JD, measured "
        "| JD / plain, measured | JD / plain, accounted | time JD / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for world in (2, 3):
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rows")
            mp.spawn(_worker, args=(world, _free_port(), configs, out), nprocs=world)
            rows = json.loads(Path(out).read_text())
        for kind, m, batch, n, plain_b, jd_b, plain_acc, jd_acc, ratio in rows:
            losses = f"{m} task" if kind == "task" else f"{batch * world} per-sample"
            if kind == "engine":
                losses += ", engine"
            print(
                f"| {world} | {losses} | {batch} | {n:,} | {plain_b / 1e3:,.0f} kB "
                f"| {jd_b / 1e3:,.0f} kB | {jd_b / plain_b:.2f}× | {jd_acc / plain_acc:.2f}× "
                f"| {ratio:.2f}× |"
            )


if __name__ == "__main__":
    main()
