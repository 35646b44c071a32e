r"""Distributed Jacobian descent on ``torch.distributed`` (any backend; gloo on CPU, NCCL on GPU).

Pass the process group (or the :class:`~torch.nn.parallel.DistributedDataParallel` model) to
:class:`~jdoptim.JDOptimizer`::

    model = DistributedDataParallel(net)
    opt = JDOptimizer(torch.optim.Adam(model.parameters()), UPGrad(), process_group=model)
    opt.step([loss1, loss2])                     # task losses, each a mean over the local shard
    # or: JDOptimizer(..., process_group=model, batch_dim=0); opt.step(per_sample_losses)
    # or, cheaper for per-sample losses: JDOptimizer(..., modules=model, batch_dim=0,
    #     process_group=model), which gathers the layers' small factors (see .engine)

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
from .engine import DistributedGramianUpdate
from .update import DistributedJacobianUpdate

__all__ = [
    "CommStats",
    "DistributedGramianUpdate",
    "DistributedJacobianUpdate",
    "DistributedStepError",
    "broadcast_parameters",
    "find_ddp_model",
    "make_distributed_update",
    "plain_ddp_bytes",
    "resolve_process_group",
]


def make_distributed_update(
    process_group: object,
    modules: nn.Module | Iterable[nn.Module] | None = None,
    batch_dim: int | None = None,
) -> DistributedJacobianUpdate | DistributedGramianUpdate:
    """The update computer of ``JDOptimizer(..., process_group=...)``.

    * ``batch_dim=0`` with ``modules``: :class:`DistributedGramianUpdate` (the engine with the
      factor exchange for per-sample losses; task losses given separately and aggregators that
      are not Gramian-weighted take the explicit-Jacobian path);
    * ``batch_dim=None`` with ``modules`` (task losses): the explicit-Jacobian path
      (:class:`DistributedJacobianUpdate`), exact and already at ``(m + 1)/2`` plain DDP steps;
      the modules are not hooked;
    * no ``modules``: :class:`DistributedJacobianUpdate`.
    """
    if batch_dim not in (None, 0):
        raise ValueError(
            f"Distributed per-sample losses need batch_dim=0 (the losses of each process are "
            f"concatenated along it), got {batch_dim}. Move the sample dimension first, or drop "
            "process_group= to run on one process."
        )
    group = resolve_process_group(process_group)
    if modules is not None and batch_dim is not None:
        module_list = [modules] if isinstance(modules, nn.Module) else list(modules)
        return DistributedGramianUpdate(module_list, group)
    return DistributedJacobianUpdate(group, per_sample=batch_dim is not None)


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


def find_ddp_model(params: Iterable[Tensor]) -> nn.parallel.DistributedDataParallel | None:
    """A live ``DistributedDataParallel`` model that holds one of ``params``, or ``None``.

    DDP leaves no mark on the parameters it replicates, so its instances are found among the
    objects the garbage collector tracks (one pass, run once per optimizer, and only when
    ``torch.distributed`` is initialised with several processes and no ``process_group`` was
    given).
    """
    import gc

    wanted = {id(p) for p in params}
    for obj in gc.get_objects():
        ddp = isinstance(obj, nn.parallel.DistributedDataParallel)
        if ddp and any(id(p) in wanted for p in obj.module.parameters()):
            return obj
    return None


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
