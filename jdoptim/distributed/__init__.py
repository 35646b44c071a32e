r"""Distributed Jacobian descent on ``torch.distributed`` (any backend; gloo on CPU, NCCL on GPU).

Pass the process group (or the :class:`~torch.nn.parallel.DistributedDataParallel` model) to
:class:`~jdoptim.JDOptimizer`::

    model = DistributedDataParallel(net)
    opt = JDOptimizer(torch.optim.Adam(model.parameters()), UPGrad(), process_group=model)
    opt.step([loss1, loss2])                     # task losses, each a mean over the local shard
    # or: JDOptimizer(..., process_group=model, batch_dim=0); opt.step(per_sample_losses)

A step on ``N`` processes, each with its shard, gives the same weights and parameters as one
process on the whole batch. See :mod:`jdoptim.distributed.update` for the algorithm and its
communication cost, and ``docs/distributed.md`` for the guide.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._comm import CommStats, DistributedStepError, plain_ddp_bytes
from .update import DistributedJacobianUpdate

__all__ = [
    "CommStats",
    "DistributedJacobianUpdate",
    "DistributedStepError",
    "broadcast_parameters",
    "make_distributed_update",
    "plain_ddp_bytes",
    "resolve_process_group",
]


def make_distributed_update(
    process_group: object, modules: object = None, batch_dim: int | None = None
) -> DistributedJacobianUpdate:
    """The update computer of ``JDOptimizer(..., process_group=...)``."""
    if modules is not None:
        raise NotImplementedError(
            "Distributed JD with the hook-based Gramian engine (modules=...) is not available "
            "yet: drop modules= to use the explicit-Jacobian path, which is exact on any number "
            "of processes (see docs/distributed.md)."
        )
    if batch_dim not in (None, 0):
        raise ValueError(f"Distributed per-sample losses need batch_dim=0, got {batch_dim}.")
    return DistributedJacobianUpdate(
        resolve_process_group(process_group), per_sample=batch_dim is not None
    )


def resolve_process_group(process_group: object) -> dist.ProcessGroup | None:
    """The process group of ``process_group``: a ``ProcessGroup``, a DDP-wrapped model (its
    group), or ``True`` (the default group, returned as ``None``)."""
    if process_group is True:
        return None
    if isinstance(process_group, nn.parallel.DistributedDataParallel):
        return process_group.process_group
    if isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise TypeError(
        "process_group must be a torch.distributed.ProcessGroup, a DistributedDataParallel "
        f"model, or True (the default group); got {type(process_group).__name__}."
    )


def broadcast_parameters(
    params: nn.Module | Iterable[Tensor], group: dist.ProcessGroup | None = None, src: int = 0
) -> None:
    """Copy rank ``src``'s parameters (and a module's buffers) to every process, as DDP does at
    construction. Call it before the first forward when the model is not wrapped in DDP."""
    if isinstance(params, nn.Module):
        tensors = [*params.parameters(), *params.buffers()]
    else:
        tensors = list(params)
    with torch.no_grad():
        for tensor in tensors:
            dist.broadcast(tensor.data, src=src, group=group)
