r"""The collectives of a distributed JD step, with byte accounting and clear failure messages.

Everything goes through ``torch.distributed`` on the given process group (gloo, NCCL, …); this
module only adds two things around each call:

* **accounting**: the bytes each process sends, by the ring/pairwise algorithms that the
  backends use for large tensors (``S`` = payload bytes of one process, ``N`` processes):

  ======================  =================================
  all-reduce              ``2 S (N-1)/N``
  all-gather              ``S (N-1)``     (``S`` = one process's piece)
  all-to-all              bytes addressed to other processes
  broadcast               ``S (N-1)/N``   (average over processes)
  ======================  =================================

  A plain DDP step all-reduces the ``n`` gradient entries: ``2 n (N-1)/N`` elements.
* **failures**: a collective that raises (a peer died, or the process group's timeout expired
  while a peer never joined) is re-raised as :class:`DistributedStepError`, naming the step's
  phase, the rank and what to check.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

#: A picklable object broadcast from one rank (the same type on every rank).
_Obj = TypeVar("_Obj")

__all__ = ["CommStats", "DistributedStepError"]

# the newer name (all_gather_into_tensor is a deprecated alias)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class DistributedStepError(RuntimeError):
    """A collective of a distributed JD step failed or timed out; nothing was updated."""


@dataclass
class CommStats:
    """What one step sent, per process (see the module docstring for the cost model).

    Attributes:
        bytes_sent: bytes this process sends in the step's collectives.
        calls: one ``(phase, collective, bytes)`` entry per collective.
    """

    bytes_sent: int = 0
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def add(self, phase: str, collective: str, nbytes: float) -> None:
        self.bytes_sent += round(nbytes)
        self.calls.append((phase, collective, round(nbytes)))


def plain_ddp_bytes(numel: int, element_size: int, world_size: int) -> int:
    """Bytes a process sends in a plain DDP step: one ring all-reduce of ``numel`` gradients."""
    return round(2 * numel * element_size * (world_size - 1) / world_size)


class Communicator:
    """Collectives over one process group, with accounting and error translation."""

    def __init__(
        self, group: dist.ProcessGroup | None, timeout: datetime.timedelta | None = None
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "Distributed JD needs an initialised process group: call "
                "torch.distributed.init_process_group(...) (or run under torchrun) first."
            )
        self.group = group
        self.timeout = timeout
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = CommStats()

    def reset_stats(self) -> CommStats:
        stats, self.stats = self.stats, CommStats()
        return stats

    def _wait(self, phase: str, work: dist.Work | None) -> None:
        try:
            if work is not None:
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
        except RuntimeError as error:  # DistBackendError and timeouts are RuntimeErrors
            raise self._failure(phase, error) from error

    def _failure(self, phase: str, error: BaseException) -> DistributedStepError:
        limit = (
            f"the timeout of {self.timeout}"
            if self.timeout is not None
            else "the process group's timeout (init_process_group(timeout=...); 30 min by default)"
        )
        return DistributedStepError(
            f"Distributed JD step, rank {self.rank} of {self.world_size}: the collective of "
            f"phase '{phase}' failed or did not complete within {limit}. Another process "
            "probably crashed, raised, or did not call step() (every process must call step() "
            "at every step, with the same number of task losses). Nothing was updated on this "
            f"process. Backend error: {error}"
        )

    def _run(self, phase: str, launch: Callable[[], dist.Work | None]) -> None:
        try:
            work = launch()
        except RuntimeError as error:
            raise self._failure(phase, error) from error
        self._wait(phase, work)

    # -- the collectives -------------------------------------------------------------------

    def all_reduce(self, phase: str, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the processes, in place."""
        n = self.world_size
        self.stats.add(phase, "all_reduce", 2 * _nbytes(tensor) * (n - 1) / n)
        self._run(phase, lambda: dist.all_reduce(tensor, group=self.group, async_op=True))
        return tensor

    def all_gather(self, phase: str, tensor: Tensor) -> Tensor:
        """Concatenate every rank's ``tensor`` (same shape everywhere) along a new first dim."""
        n = self.world_size
        out = tensor.new_empty((n * tensor.shape[0], *tensor.shape[1:]) if tensor.dim() else n)
        self.stats.add(phase, "all_gather", _nbytes(tensor) * (n - 1))
        self._run(
            phase,
            lambda: _all_gather(out, tensor.contiguous(), group=self.group, async_op=True),
        )
        return out.view(n, *tensor.shape)

    def all_to_all(
        self, phase: str, tensor: Tensor, input_splits: list[int], output_splits: list[int]
    ) -> Tensor:
        """Send ``tensor``'s chunk ``k`` (sizes ``input_splits`` along dim 0) to rank ``k``."""
        out = tensor.new_empty((sum(output_splits), *tensor.shape[1:]))
        row = tensor[0].numel() * tensor.element_size() if tensor.shape[0] else 0
        self.stats.add(phase, "all_to_all", row * (sum(input_splits) - input_splits[self.rank]))
        self._run(
            phase,
            lambda: dist.all_to_all_single(
                out, tensor, output_splits, input_splits, group=self.group, async_op=True
            ),
        )
        return out

    def broadcast(self, phase: str, tensor: Tensor, src_rank: int = 0) -> Tensor:
        """Copy rank ``src_rank``'s ``tensor`` (group rank) to every rank, in place."""
        n = self.world_size
        self.stats.add(phase, "broadcast", _nbytes(tensor) * (n - 1) / n)
        src = dist.get_global_rank(self.group, src_rank) if self.group is not None else src_rank
        self._run(phase, lambda: dist.broadcast(tensor, src=src, group=self.group, async_op=True))
        return tensor

    def broadcast_object(self, phase: str, obj: _Obj, src_rank: int = 0) -> _Obj:
        """Rank ``src_rank``'s picklable ``obj``, on every rank (small, one-off objects)."""
        holder = [obj]
        src = dist.get_global_rank(self.group, src_rank) if self.group is not None else src_rank
        try:
            dist.broadcast_object_list(holder, src=src, group=self.group)
        except RuntimeError as error:
            raise self._failure(phase, error) from error
        self.stats.add(phase, "broadcast_object", 0)  # one-off; its size is not tracked
        return holder[0]


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def device_of(tensors: list[Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


class OnCommunicator:
    """What a distributed update computer reads of its :class:`Communicator` (``comm``): its
    process group's size and this process's rank."""

    comm: Communicator

    @property
    def world_size(self) -> int:
        return self.comm.world_size

    @property
    def rank(self) -> int:
        return self.comm.rank
