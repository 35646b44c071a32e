"""Jacobian descent with DistributedDataParallel, on CPU with gloo.

Run with::

    torchrun --nproc_per_node=2 examples/ddp.py                 # 2 task losses
    torchrun --nproc_per_node=2 examples/ddp.py --per-sample    # per-sample losses

Each process trains the same DDP-wrapped two-task model on its shard of every global batch; a JD
step on N processes gives the same weights and parameters as one process on the whole batch.
Rank 0 prints the weights, the bytes this process sent and what a plain DDP step would have sent,
and saves a checkpoint that resumes on any number of processes.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from jdoptim import JDOptimizer, UPGrad


class TwoTasks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.regression, self.classification = nn.Linear(32, 1), nn.Linear(32, 3)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z = self.trunk(x)
        return self.regression(z).squeeze(-1), self.classification(z)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--per-sample", action="store_true", help="per-sample losses (batch_dim=0)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--checkpoint", default="jd_ddp_checkpoint.pt")
    args = parser.parse_args()

    # A process that dies or stalls makes the others raise DistributedStepError after this
    # timeout (or at once, when its connection closes) instead of waiting forever.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same data stream everywhere; DDP syncs the parameters anyway

    model = DistributedDataParallel(TwoTasks())
    optimizer = JDOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-3),
        UPGrad(),
        process_group=model,  # or a ProcessGroup, or True for the default group
        batch_dim=0 if args.per_sample else None,
    )
    if os.path.exists(args.checkpoint):  # saved on rank 0, possibly by another world size
        state = torch.load(args.checkpoint, weights_only=False)
        model.module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])  # on every process
        if rank == 0:
            print(f"resumed from {args.checkpoint}")

    local = args.global_batch // world  # equal shards: the task losses are global means
    for step in range(args.steps):
        x = torch.randn(args.global_batch, 10)
        y_reg, y_cls = x[:, :3].sum(dim=1), (x[:, 3] > 0).long() + (x[:, 4] > 0).long()
        mine = slice(rank * local, (rank + 1) * local)
        prediction, logits = model(x[mine])
        squared = (prediction - y_reg[mine]).pow(2)
        cross_entropy = nn.functional.cross_entropy(logits, y_cls[mine], reduction="none")
        optimizer.zero_grad()
        if args.per_sample:
            record = optimizer.step(squared + cross_entropy)  # one loss per local sample
        else:
            record = optimizer.step({"regression": squared.mean(), "class": cross_entropy.mean()})
        if rank == 0 and step % 5 == 0:
            # record.losses are this process's; weights and Gramian are the global ones.
            weights = record.weights_by_name if not args.per_sample else record.weights.shape
            print(
                f"step {step}: weights {weights}; sent {record.extras['bytes_sent']:,} B "
                f"(a plain DDP step: {record.extras['plain_ddp_bytes']:,} B)"
            )

    if rank == 0:
        torch.save(
            {"model": model.module.state_dict(), "optimizer": optimizer.state_dict()},
            args.checkpoint,
        )
        print(f"saved {args.checkpoint}")
    # Release what holds the process group (DDP's reducer, the optimizer's communicator) before
    # destroying it: gloo aborts the process at exit when a group dies under live users.
    del optimizer, model
    dist.barrier()  # and nobody tears the group down while rank 0 is still writing
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
