r"""Exact distributed JD with the hook-based Gramian engine: :class:`DistributedGramianUpdate`.

``JDOptimizer(opt, aggregator, modules=model, batch_dim=0, process_group=...)`` with
**per-sample losses**: process ``r`` passes the ``B_r`` losses of its shard; the global losses are
their concatenation in rank order (``B = Σ_r B_r``, unequal shards allowed), and the step gives
the same ``B × B`` Gramian, weights and update as one process running the engine on the whole
batch.

**Factor exchange.** The engine's rules contract small per-sample factors into the Gramian
(:mod:`jdoptim.autogram.rules`). For a ``Linear`` layer (``S`` positions per sample, inputs
``a_{is} ∈ R^d``, output gradients ``D_{is} ∈ R^o``) the weight's block is

.. math::  G_{ij} = Σ_{s,r} ⟨a_{is}, a_{jr}⟩ ⟨D_{is}, D_{jr}⟩ ,

so the cross-process blocks ``G_{ij}`` (``i`` on process ``r``, ``j`` on process ``s``) need only
the other processes' ``(A, D)``: ``B_r S (d + o)`` numbers per layer instead of ``B_r o d``. Each
process therefore

1. runs the engine's one backward pass on its shard (local ``A``, ``D``);
2. **gathers along the sample dimension**, in one collective, the factors of each hooked call's
   Gramian terms, as its rule states them
   (:meth:`~jdoptim.autogram.rules.LayerRule.factorisation`; no dispatch on rule classes
   here): a kernel term (``Linear``, transformers' ``Conv1D``, an ungrouped ``Conv``, any
   :class:`~jdoptim.autogram.rules.LinearLikeRule`) sends its inputs (im2col columns for
   ``Conv``) and output gradients, or its per-sample weight rows when those are narrower
   (``o d < S (d + o)``); an index term (``Embedding``) its indices (one int64 gather) and
   output gradients; rows terms (normalisation layers, grouped convolutions, the
   ``torch.func`` fallback, parameters tied across calls and parameters used outside hooked
   calls) their per-sample rows (exact; as wide as the parameters for the fallback).
   :attr:`DistributedGramianUpdate.last_exchange` lists what was gathered;
3. computes the global Gramian with the terms' own contractions on the gathered factors
   (identical inputs and code on every process, the same code as the local engine's),
   ``w = W(G)``, and takes rank 0's ``w`` (**broadcast**, ``B`` elements), as the
   explicit-Jacobian path does;
4. computes its local weighted gradient ``Σ_{i ∈ shard r} wᵢ ∇ℓᵢ`` with the rules' ``weighted``
   (no second backward), and **all-reduces** (sums) it: ``d = Σ_r Σ_{i ∈ r} wᵢ ∇ℓᵢ = Jᵀ w``, as
   one process computes it on the whole batch (no ``1/N``: per-sample losses are concatenated,
   not averaged).

The gather with per-rank sizes is an all-to-all of the local factors repeated for every
destination (no padding: ``B_r W (N-1)`` elements sent for ``W`` factor numbers per sample).
Cost per process and step, in elements: ``≈ Σ_layers B_r S (d_in + d_out)`` gathered, plus one
gradient all-reduce ``2 n (N-1)/N`` (exactly a plain DDP step's), plus ``B`` weights and two tiny
agreement collectives.

Task losses (given separately) and aggregators that are not Gramian-weighted go to
:class:`~jdoptim.distributed.update.DistributedJacobianUpdate` (task mode, resp. per-sample
mode), which is exact too.

**Design: composition, not inheritance.** :class:`DistributedGramianUpdate` owns two
explicit-Jacobian computers on one communicator (one set of counters per step): the per-sample
one (the route of an aggregator that needs all of ``J``, and the process-group machinery of the
engine's route: agreement, signature and replica check, the aggregator's rank-0 state,
statistics) and the task one (task losses). It implements the
:class:`~jdoptim.updates.base.UpdateComputer` interface by delegating to them, so that a member
of the interface reaches both (e.g. :meth:`~DistributedGramianUpdate.forget_aggregator_sync`).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..autogram._step import GramianStep
from ..autogram.engine import Engine, gramian_dtype
from ..autogram.rules import GramianTerm, RowsTerm
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from ..updates.base import UpdateComputer, UpdateResult, gramian_weights
from ._comm import CommStats, OnCommunicator
from .update import DistributedJacobianUpdate, _specific_per_sample

__all__ = ["DistributedGramianUpdate", "ExchangedTerm"]


@dataclass(frozen=True)
class ExchangedTerm:
    """One Gramian term a process gathered in the last step: the module it came from (its path
    in the model, or ``"tied or explicit parameters"`` for the rows summed over several calls
    and those straight from autograd) and the term's kind (``"kernel"``, ``"index"``,
    ``"rows"``; see :mod:`jdoptim.autogram.rules`)."""

    module: str
    kind: str


_TIED = "tied or explicit parameters"


class DistributedGramianUpdate(OnCommunicator, UpdateComputer):
    """The exact distributed update of the Gramian engine for per-sample losses (module docs).

    Args:
        modules: the modules to hook (as ``JDOptimizer(modules=...)``).
        group: the process group (``None``: the default group).
        timeout: as for :class:`DistributedJacobianUpdate`.
        check_replicas: as for :class:`DistributedJacobianUpdate`.

    :attr:`last_stats` and :attr:`last_plain_ddp_bytes` are as for the explicit-Jacobian path;
    :attr:`last_exchange` lists the Gramian terms the last per-sample step gathered
    (:class:`ExchangedTerm`: the module's path and the term's kind), e.g. to see that a layer
    sends its kernel factors rather than its per-sample rows.
    """

    distributed = True

    def __init__(
        self,
        modules: Sequence[nn.Module],
        group: dist.ProcessGroup | None = None,
        *,
        timeout: datetime.timedelta | None = None,
        check_replicas: bool = True,
    ) -> None:
        #: per-sample losses: the explicit route, and the process-group machinery of the engine's
        self.sample_update = DistributedJacobianUpdate(
            group, per_sample=True, timeout=timeout, check_replicas=check_replicas
        )
        #: task losses (given separately): the explicit route
        self.task_update = DistributedJacobianUpdate(
            group, per_sample=False, timeout=timeout, check_replicas=check_replicas
        )
        self.comm = self.sample_update.comm
        self.task_update.comm = self.comm  # one set of counters for the step
        #: the terms gathered in the last per-sample step, in order
        self.last_exchange: list[ExchangedTerm] = []
        self.last_stats: CommStats | None = None
        self.last_plain_ddp_bytes: int | None = None
        self.engine = Engine(*modules, batch_dim=0)

    def agree(
        self, error: BaseException | None, nonfinite: bool, device: torch.device | None = None
    ) -> bool:
        """As :meth:`DistributedJacobianUpdate.agree` (the first collective of every step)."""
        return self.sample_update.agree(error, nonfinite, device)

    def any_process(self, flag: bool, device: torch.device | None = None) -> bool:
        """``True`` if ``flag`` is true on any process."""
        return self.sample_update.any_process(flag, device)

    def forget_aggregator_sync(self) -> None:
        """Copy rank 0's aggregator state again at the next step, on either route."""
        self.sample_update.forget_aggregator_sync()
        self.task_update.forget_aggregator_sync()

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        if batch.separate is not None:  # task losses: the explicit-Jacobian task path
            return self._explicit(self.task_update, batch, plan, aggregator)
        if not isinstance(aggregator, GramianWeightedAggregator):  # needs all of J
            return self._explicit(self.sample_update, batch, plan, aggregator)
        shared = list(plan.shared)
        step: GramianStep | None = None
        error: Exception | None = _specific_per_sample(plan)
        try:  # a local failure is reported to every process by the signature's all-gather
            if error is None:
                step = self.engine.step(batch.vector, shared, [], per_sample=True)
        except Exception as exc:
            error = exc
        machinery = self.sample_update
        sizes = machinery._check_signature(batch.m, shared, [], error).tolist()
        assert step is not None
        machinery._sync_aggregator(aggregator)
        dtype = gramian_dtype(batch.vector.dtype, shared)  # at least the parameters' precision
        with torch.no_grad():
            gramian = self._global_gramian(step, sizes).to(dtype)
            weights = gramian_weights(aggregator, gramian)  # refuses a non-finite Gramian
            weights = self.comm.broadcast("weights", weights.to(dtype).contiguous())
            start = sum(sizes[: self.rank])
            local, _ = step.gradients(weights[start : start + sizes[self.rank]])
            shared_grads = self._sum_gradients(local)
        extras = machinery._finish_stats(shared, dtype)
        self.last_stats = machinery.last_stats
        self.last_plain_ddp_bytes = machinery.last_plain_ddp_bytes
        return UpdateResult(shared_grads, [], weights, gramian, extras)

    def _explicit(
        self,
        computer: DistributedJacobianUpdate,
        batch: LossBatch,
        plan: ParameterPlan,
        aggregator: Aggregator,
    ) -> UpdateResult:
        """The step on the explicit-Jacobian route of ``computer``, its statistics as ours."""
        result = computer.compute(batch, plan, aggregator)
        self.last_stats = computer.last_stats
        self.last_plain_ddp_bytes = computer.last_plain_ddp_bytes
        return result

    # -- the factor exchange ----------------------------------------------------------------

    def _terms(self, step: GramianStep) -> list[tuple[str, GramianTerm]]:
        """What this process contributes to the global Gramian, by module: each rule's
        factorisation (:meth:`~jdoptim.autogram.rules.LayerRule.factorisation`), in the form
        it is cheapest to gather (:meth:`~jdoptim.autogram.rules.GramianTerm.exchanged`)."""
        terms: list[tuple[str, GramianTerm]] = []
        per_sample = step.batch_dim is not None  # else explicit parameters: b = 1, T = B_r
        for parts in step.rule_parameters:
            if not parts.alone:
                continue
            label = step.label(parts.rule.call.module)
            if per_sample:  # T = 1: the samples are the losses
                for term in parts.rule.factorisation(parts.alone):
                    terms.extend((label, t) for t in term.exchanged())
            else:  # one row per loss: gathered along the losses
                rows = parts.rule.jacobians(parts.alone)
                terms.extend((label, RowsTerm.per_loss(r)) for r in rows)
        terms.extend((_TIED, RowsTerm.per_loss(rows)) for rows in step.shared_rows())
        return terms

    def _global_gramian(self, step: GramianStep, sizes: list[int]) -> Tensor:
        """``Σ`` over the terms of each term rebuilt on every process's factors."""
        terms = self._terms(step)
        self.last_exchange = [ExchangedTerm(label, term.kind) for label, term in terms]
        factors = [term.factors() for _, term in terms]
        flat = [f for group in factors for f in group]
        gathered: dict[int, Tensor] = {}
        for is_float in (True, False):
            group = [i for i, f in enumerate(flat) if f.is_floating_point() == is_float]
            if group:
                pieces = self._gather([flat[i] for i in group], sizes)
                gathered.update(zip(group, pieces))
        gramian: Tensor | None = None
        index = 0
        for (_, term), local in zip(terms, factors):
            every = [gathered[i] for i in range(index, index + len(local))]
            index += len(local)
            part = term.from_factors(every).gramian()
            part = part.reshape(part.shape[0] * part.shape[1], -1)
            gramian = part if gramian is None else gramian + part
        if gramian is None:
            return torch.zeros(sum(sizes), sum(sizes))
        return gramian

    def _gather(self, factors: list[Tensor], sizes: list[int]) -> list[Tensor]:
        """All-gather ``factors`` (``[b, ...]``) along the sample dimension (per-rank sizes
        ``sizes``) as one all-to-all of the packed local factors, repeated for every
        destination."""
        b = sizes[self.rank]
        dtype = factors[0].dtype
        for factor in factors[1:]:
            dtype = torch.promote_types(dtype, factor.dtype)
        packed = torch.cat([f.reshape(b, -1).to(dtype) for f in factors], dim=1)
        n = self.world_size
        send = packed.repeat(n, 1)  # the chunk for rank k is our own [b, W] block
        received = self.comm.all_to_all("factors", send, [b] * n, sizes)  # [B, W]
        gathered = []
        offset = 0
        for factor in factors:
            width = math.prod(factor.shape[1:])
            piece = received[:, offset : offset + width]
            gathered.append(piece.reshape(-1, *factor.shape[1:]).to(factor.dtype))
            offset += width
        return gathered

    def _sum_gradients(self, local: list[Tensor]) -> list[Tensor]:
        """One all-reduce (sum) of the local weighted gradients: the bytes of a DDP step."""
        if not local:
            return []
        dtype = local[0].dtype
        for grad in local[1:]:
            dtype = torch.promote_types(dtype, grad.dtype)
        flat = torch.cat([g.reshape(-1).to(dtype) for g in local])
        self.comm.all_reduce("update", flat)
        pieces = flat.split([g.numel() for g in local])
        return [piece.view_as(g).to(g.dtype) for piece, g in zip(pieces, local)]
