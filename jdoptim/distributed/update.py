r"""Exact distributed JD on the explicit-Jacobian path: :class:`DistributedJacobianUpdate`.

``N`` processes each hold a shard of the global batch and compute their local losses. Let
``J⁽ʳ⁾`` be the Jacobian of process ``r``'s losses with respect to the shared parameters
(``n`` entries), computed with one batched backward as in
:class:`jdoptim.updates.jacobian.JacobianUpdate`.

**Task losses** (``per_sample=False``): every process has the same ``m`` task losses, each a mean
over its shard. The global task loss is the mean over processes of the local ones (DDP's own
convention: exact for the mean over the global batch when the shards have equal sizes), so

.. math::  J = \frac1N \sum_r J^{(r)}, \qquad G = J Jᵀ \ne \frac1N \sum_r J^{(r)} J^{(r)ᵀ} .

The Gramian is not linear in the local Jacobians, so some ``m × n`` quantity must be reduced.
Instead of all-reducing ``J`` (``2 m n (N-1)/N`` elements sent per process), the step

1. **reduce-scatters** ``Jᵀ`` by column slices: process ``k`` gets the exact global
   ``J_{:,S_k}`` for its ``n/N`` columns ``S_k`` (``m n (N-1)/N`` elements; done as an
   all-to-all of the slices and a local sum, because gloo's ``reduce_scatter`` sends as much as
   an all-reduce);
2. computes its partial Gramian ``J_{:,S_k} J_{:,S_k}ᵀ`` and **all-reduces** the ``m × m``
   partials: ``G = Σ_k J_{:,S_k} J_{:,S_k}ᵀ`` exactly (``2 m² (N-1)/N``), together with the
   gradients of the task-specific parameters (each the mean of the local ones);
3. computes ``w = W(G)`` on every process (identical inputs), then takes rank 0's ``w``
   (**broadcast**, ``m`` elements), so that randomised or non-deterministic weightings agree;
4. computes its slice ``d_{S_k} = J_{:,S_k}ᵀ w`` and **all-gathers** the slices
   (``n (N-1)/N``): every process gets ``d = Jᵀ w`` bit-for-bit identical.

Steps 1 and 4 are the two halves of a ring all-reduce (reduce-scatter, then all-gather) with the
Gramian solved in between, so the whole step sends about ``(m + 1)/2`` times what a plain DDP
step sends (``2 n (N-1)/N``): ``1.5×`` for two tasks. DDP's reducer is not used: the final update
is already reduced, and its all-gather costs half of DDP's all-reduce.

**Per-sample losses** (``per_sample=True``): process ``r`` has ``B_r`` per-sample losses; the
global losses are their concatenation (``B = Σ_r B_r``; unequal shards are natural here) and the
global Gramian has the cross-process blocks ``G_{rs} = J⁽ʳ⁾ J⁽ˢ⁾ᵀ``. An **all-to-all** sends each
process the rows of every ``J⁽ʳ⁾`` restricted to its column slice (``B_r n (N-1)/N``), each
process computes ``J_{:,S_k} J_{:,S_k}ᵀ`` (``B × B``), these are all-reduced, and steps 3–4 are
as above with ``B`` weights. The update is ``d = Jᵀ w = Σ_r J⁽ʳ⁾ᵀ w⁽ʳ⁾``, exactly what one process
computes on the whole batch.

Aggregators that are not Gramian-weighted need all of ``J``: it is all-gathered after step 1
(``m n (N-1)/N``, or ``B n (N-1)/N``), aggregated on every process, and rank 0's ``d`` is
broadcast.

**Interface** (:class:`~jdoptim.updates.base.UpdateComputer`): the agreement between processes is
this computer's :meth:`~DistributedJacobianUpdate.agree`, the first collective of every step, which
``JDOptimizer.step`` calls after each process checked its own input (so that all processes fail,
skip or go on together); ``distributed`` is ``True``; the traffic of the step is returned as
``UpdateResult.stats`` (:class:`~jdoptim.record.CommunicationStats`). A ``GradScaler`` wraps
this computer like a local one (:class:`jdoptim.updates.scaled.ScaledUpdate`).
"""

from __future__ import annotations

import datetime
import math

import torch
import torch.distributed as dist
from torch import Tensor

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..aggregation.state import broadcast_state_dict
from ..autojac import JacobianComputer
from ..linalg.sparse_rows import dense
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from ..record import CommunicationStats
from ..updates.base import UpdateComputer, UpdateResult, aggregate_jacobian, gramian_weights
from ._comm import CommStats, Communicator, DistributedStepError, OnCommunicator, plain_ddp_bytes

__all__ = ["DistributedJacobianUpdate"]


class DistributedJacobianUpdate(OnCommunicator, UpdateComputer):
    """The exact distributed JD update of the explicit-Jacobian path (module docstring).

    Args:
        group: the process group (``None``: the default group).
        per_sample: the losses are per-sample losses whose global vector is the concatenation of
            the processes' vectors (``JDOptimizer(..., batch_dim=0)``); otherwise they are task
            losses, each a mean over the local shard, whose global value is the mean over
            processes.
        timeout: wait at most this long for each collective (``None``: the process group's
            timeout).
        check_replicas: at every step, check (one tiny all-gather) that all processes have the
            same number of losses and parameters and bit-identical parameters, and raise a clear
            error otherwise (instead of hanging or silently diverging).
        use_vmap: compute the local Jacobian with one batched backward.

    After each step, :attr:`last_stats` holds the bytes this process sent
    (:class:`~jdoptim.distributed.CommStats`), and :attr:`last_plain_ddp_bytes` what a plain DDP
    step would have sent for the same parameters; the step's result carries both as
    :class:`~jdoptim.record.CommunicationStats` (``StepRecord.communication``).
    """

    distributed = True

    def __init__(
        self,
        group: dist.ProcessGroup | None = None,
        *,
        per_sample: bool = False,
        timeout: datetime.timedelta | None = None,
        check_replicas: bool = True,
        use_vmap: bool = True,
    ) -> None:
        self.comm = Communicator(group, timeout)
        self.per_sample = per_sample
        self.check_replicas = check_replicas
        self.jacobian_computer = JacobianComputer(use_vmap)
        self.last_stats: CommStats | None = None
        self.last_plain_ddp_bytes: int | None = None
        self._aggregator_synced: Aggregator | None = None

    # -- agreement between processes ------------------------------------------------------

    def any_process(self, flag: bool, device: torch.device | None = None) -> bool:
        """``True`` if ``flag`` is true on any process (used for non-finite losses, so that all
        processes skip or raise together)."""
        return self.agree(None, flag, device)

    def agree(
        self, error: BaseException | None, nonfinite: bool, device: torch.device | None = None
    ) -> bool:
        """The first collective of a step, after each process checked its own inputs.

        Every process reports whether its checks raised ``error`` and whether it has a
        non-finite loss. If any raised, every process fails this step: the one that raised
        re-raises its own error, the others a :class:`DistributedStepError` saying which
        ranks failed. So a training loop that catches the error and goes on stays in lockstep
        (step ``k`` of every process pairs with step ``k`` of the others). Otherwise returns
        whether any process has a non-finite loss (all then skip or raise together).
        """
        self.comm.reset_stats()  # the first collective of a step
        if device is None:  # NCCL only takes CUDA tensors
            nccl = dist.get_backend(self.comm.group) == "nccl"
            device = torch.device("cuda", torch.cuda.current_device()) if nccl else None
        flags = torch.zeros(1 + self.world_size, device=device)
        flags[0] = 1.0 if nonfinite else 0.0
        flags[1 + self.rank] = 0.0 if error is None else 1.0
        self.comm.all_reduce("agree", flags)
        self._raise_if_any_failed(error, flags[1:].cpu(), "the checks of its step's input")
        return bool(flags[0].item() > 0)

    def _raise_if_any_failed(self, error: BaseException | None, failed: Tensor, where: str) -> None:
        """Re-raise this process's ``error``, or a :class:`DistributedStepError` on the others
        when a process failed (``failed``: one flag per rank), so that all fail the step."""
        if error is not None:
            raise error
        ranks = [r for r, flag in enumerate(failed.tolist()) if flag > 0]
        if ranks:
            raise DistributedStepError(
                f"Distributed JD step, rank {self.rank} of {self.world_size}: rank(s) "
                f"{', '.join(map(str, ranks))} raised an error in {where} (see the error raised "
                "there), so every process fails this step, and nothing was updated on any. A "
                "training loop that catches this error and goes on stays in step with the others."
            )

    def forget_aggregator_sync(self) -> None:
        """Copy rank 0's aggregator state again at the next step (after a restore or a load)."""
        self._aggregator_synced = None

    def _check_signature(
        self,
        m: int,
        shared: list[Tensor],
        specific: list[Tensor],
        error: BaseException | None = None,
    ) -> Tensor:
        """All-gather ``[m, n_shared, n_specific, Σθ, Σθ², failed]``; return the per-rank ``m``.

        ``error`` is what this process's local backward raised, if anything: then every
        process fails the step together (see :meth:`_raise_if_any_failed`).
        """
        device = shared[0].device if shared else specific[0].device
        signature = torch.zeros(6, dtype=torch.float64, device=device)
        signature[0] = m
        signature[1] = sum(p.numel() for p in shared)
        signature[2] = sum(p.numel() for p in specific)
        signature[5] = 0.0 if error is None else 1.0
        if self.check_replicas:
            with torch.no_grad():
                for param in shared + specific:
                    flat = param.detach().to(torch.float64)
                    signature[3] += flat.sum()
                    signature[4] += flat.square().sum()
        everyone = self.comm.all_gather("signature", signature).cpu()
        self._raise_if_any_failed(error, everyone[:, 5], "its local backward pass")
        mine = everyone[self.rank]
        columns = [1, 2] if self.per_sample else [0, 1, 2]
        if not bool((everyone[:, columns] == mine[columns]).all()):
            rows = ", ".join(
                f"rank {r}: m={int(s[0])}, shared={int(s[1])}, specific={int(s[2])}"
                for r, s in enumerate(everyone)
            )
            raise ValueError(
                "The processes disagree on the shape of the JD step "
                f"({rows}). Every process must pass the same number of task losses, reaching "
                "the same parameters (per-sample losses may differ in number only)."
            )
        if self.check_replicas and not bool((everyone[:, 3:5] == mine[3:5]).all()):
            raise ValueError(
                "The model's parameters differ between processes, so their JD steps would "
                "diverge. Wrap the model in DistributedDataParallel (which broadcasts rank 0's "
                "parameters at construction), or call "
                "jdoptim.distributed.broadcast_parameters(model) before the first forward, and "
                "seed every process alike."
            )
        return everyone[:, 0].round().long()

    def _sync_aggregator(self, aggregator: Aggregator) -> None:
        """Once per aggregator: load rank 0's aggregator state everywhere (random generators
        seeded differently, a checkpoint loaded on rank 0 only)."""
        if self._aggregator_synced is aggregator:
            return
        state = broadcast_state_dict(aggregator)  # its declared rank-0 state
        if state:
            state = self.comm.broadcast_object("aggregator state", state)
            if self.rank != 0:
                aggregator.load_state_dict(state)
        self._aggregator_synced = aggregator

    # -- the step -------------------------------------------------------------------------

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        shared = list(plan.shared)
        specific = [param for param, _ in plan.specific]
        error: Exception | None = _specific_per_sample(plan) if self.per_sample else None
        blocks: list[Tensor] = []
        if error is None:
            blocks, error = self._local_jacobian(batch, shared + specific)
        sizes = self._check_signature(batch.m, shared, specific, error)
        self._sync_aggregator(aggregator)

        shared_blocks, specific_blocks = blocks[: len(shared)], blocks[len(shared) :]
        local_specific = [block[index] for block, (_, index) in zip(specific_blocks, plan.specific)]
        dtype = blocks[0].dtype
        chunk = None
        if shared:
            chunk = (
                self._per_sample_chunk(shared_blocks, sizes)
                if self.per_sample
                else self._task_chunk(shared_blocks)
            )  # [rows, c] = J[:, S_k] (rows = m, or B in per-sample mode)
        gramian, specific_grads = self._reduce_gramian(chunk, local_specific, dtype)
        if chunk is None:
            stats = self._finish_stats(shared + specific, dtype)
            return UpdateResult([], specific_grads, None, None, stats)
        weights, shared_grads = self._shared_update(chunk, gramian, shared, aggregator, dtype)
        stats = self._finish_stats(shared + specific, dtype)
        return UpdateResult(shared_grads, specific_grads, weights, gramian, stats)

    def _reduce_gramian(
        self, chunk: Tensor | None, local_specific: list[Tensor], dtype: torch.dtype
    ) -> tuple[Tensor, list[Tensor]]:
        """One all-reduce for the partial Gramians ``J[:, S_k] J[:, S_k]ᵀ`` and the specific
        gradients: the global Gramian, and the specific gradients' mean over processes."""
        partial = chunk @ chunk.T if chunk is not None else torch.zeros(0, 0)
        rows = partial.shape[0]
        flat_specific = [g.reshape(-1).to(dtype) for g in local_specific]
        buffer = torch.cat([partial.reshape(-1).to(dtype), *flat_specific])
        if buffer.numel():
            self.comm.all_reduce("gramian", buffer)
        gramian = buffer[: rows * rows].view(rows, rows)
        specific_flat = buffer[rows * rows :] / self.world_size
        pieces = specific_flat.split([g.numel() for g in local_specific])
        return gramian, [piece.view_as(g) for piece, g in zip(pieces, local_specific)]

    def _shared_update(
        self,
        chunk: Tensor,
        gramian: Tensor,
        shared: list[Tensor],
        aggregator: Aggregator,
        dtype: torch.dtype,
    ) -> tuple[Tensor | None, list[Tensor]]:
        """Rank 0's weights (or ``None``) and the shared parameters' gradients, identical on
        every process: ``d = Jᵀ w`` from the all-gathered slices ``J[:, S_k]ᵀ w``, or, for an
        aggregator that needs all of ``J``, rank 0's ``A(J)``."""
        with torch.no_grad():
            if isinstance(aggregator, GramianWeightedAggregator):
                weights = gramian_weights(aggregator, gramian)
                weights = self.comm.broadcast("weights", weights.to(dtype).contiguous())
                direction = self.comm.all_gather("update", chunk.T @ weights).reshape(-1)
            else:
                weights = None
                rows = chunk.shape[0]
                gathered = self.comm.all_gather("jacobian", chunk)  # [N, rows, c]
                matrix = gathered.permute(1, 0, 2).reshape(rows, -1)
                numel = sum(p.numel() for p in shared)
                direction = aggregate_jacobian(aggregator, matrix[:, :numel].contiguous())
                direction = self.comm.broadcast("update", direction.contiguous())
        numels = [p.numel() for p in shared]
        direction = direction[: sum(numels)]
        return weights, [piece.view_as(p) for piece, p in zip(direction.split(numels), shared)]

    def _local_jacobian(
        self, batch: LossBatch, inputs: list[Tensor]
    ) -> tuple[list[Tensor], Exception | None]:
        """This process's Jacobian blocks, or the error its backward raised (reported to the
        other processes by the signature's all-gather before it is raised)."""
        try:
            blocks = self.jacobian_computer.compute(batch.vector, inputs)
        except Exception as error:
            return [], error
        # A sparse block (a sparse embedding's) is made dense: the processes exchange slices of
        # the whole Jacobian, whose looked-up rows differ from one process to another.
        return [dense(b) for b in blocks], None

    def _chunk_size(self, numel: int) -> int:
        return max(1, math.ceil(numel / self.world_size))

    def _task_chunk(self, blocks: list[Tensor]) -> Tensor:
        """Reduce-scatter ``Jᵀ`` (``[n, m]``, zero-padded to ``N c`` rows): ``J[:, S_k]``.

        As an all-to-all of the column slices followed by a local sum in rank order: the same
        ``m n (N-1)/N`` elements as a ring reduce-scatter, on every backend (gloo's
        ``reduce_scatter`` sends as much as a full all-reduce, measured).
        """
        m = blocks[0].shape[0]
        numel = sum(block[0].numel() for block in blocks)
        c = self._chunk_size(numel)
        transposed = blocks[0].new_zeros(c * self.world_size, m)
        offset = 0
        for block in blocks:
            size = block[0].numel()
            transposed[offset : offset + size].copy_(block.reshape(m, size).T)
            offset += size
        n = self.world_size
        pieces = self.comm.all_to_all("jacobian", transposed, [c] * n, [c] * n)
        return pieces.view(n, c, m).sum(dim=0).T.div_(n)  # [m, c], the mean of the ranks' J

    def _per_sample_chunk(self, blocks: list[Tensor], sizes: Tensor) -> Tensor:
        """All-to-all of column slices: every process's rows of ``J[:, S_k]`` (``[B, c]``)."""
        rows = blocks[0].shape[0]
        numel = sum(block[0].numel() for block in blocks)
        c = self._chunk_size(numel)
        n = self.world_size
        padded = blocks[0].new_zeros(rows, c * n)
        offset = 0
        for block in blocks:
            size = block[0].numel()
            padded[:, offset : offset + size].copy_(block.reshape(rows, size))
            offset += size
        send = padded.view(rows, n, c).transpose(0, 1).reshape(n * rows, c)
        return self.comm.all_to_all("jacobian", send, [rows] * n, sizes.tolist())

    def _finish_stats(self, params: list[Tensor], dtype: torch.dtype) -> CommunicationStats:
        """Close the step's accounting: :attr:`last_stats`, :attr:`last_plain_ddp_bytes`, and
        the typed statistics the step's result carries."""
        self.last_stats = self.comm.reset_stats()
        numel = sum(p.numel() for p in params)
        element = torch.empty((), dtype=dtype).element_size()
        self.last_plain_ddp_bytes = plain_ddp_bytes(numel, element, self.world_size)
        return CommunicationStats(
            world_size=self.world_size,
            bytes_sent=self.last_stats.bytes_sent,
            plain_ddp_bytes=self.last_plain_ddp_bytes,
            calls=tuple(self.last_stats.calls),
        )


def _specific_per_sample(plan: ParameterPlan) -> ValueError | None:
    """The error for task-specific parameters with per-sample losses (reported to every
    process before it is raised), or ``None``."""
    if not plan.specific:
        return None
    return ValueError(
        "With per-sample losses (batch_dim=0), pass them as one 1-D tensor (every reached "
        "parameter is then shared), or use scope='all'."
    )
