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
2. **gathers along the sample dimension**, in one collective, what each hooked call's rule
   contracts: ``Linear``/``Conv``: inputs (im2col columns for ``Conv``) and output gradients,
   or the per-sample weight rows when those are narrower (``o d < S (d + o)``);
   ``Embedding``: the indices (one int64 gather) and output gradients; normalisation layers,
   the ``torch.func`` fallback, parameters tied across calls and parameters used outside hooked
   calls: their per-sample rows (exact; as wide as the parameters for the fallback);
3. computes the global Gramian with the engine's own contraction functions on the gathered
   factors (identical inputs and code on every process), ``w = W(G)``, and takes rank 0's ``w``
   (**broadcast**, ``B`` elements), as the explicit-Jacobian path does;
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
from ..autogram.rules import LayerRule
from ..autogram.rules._contraction import gramian_from_kernel, rows_gramian, weight_and_bias_gramian
from ..autogram.rules.conv import ConvRule
from ..autogram.rules.embedding import EmbeddingRule
from ..autogram.rules.linear import LinearRule
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from ..update import UpdateResult, gramian_weights
from .update import DistributedJacobianUpdate, _specific_per_sample

__all__ = ["DistributedGramianUpdate"]


@dataclass
class _Factor:
    """One per-sample factor to gather: ``local`` is ``[b, *shape]`` (samples first)."""

    local: Tensor
    gathered: Tensor | None = None


@dataclass
class _Term:
    """One Gramian contribution, computed from gathered factors once they have arrived.

    ``kind``: ``"linear"`` (factors inputs ``[b, S, d]`` and grads ``[b, S, o]``, parameters
    ``params`` of a layer with weight ``weight``), ``"embedding"`` (indices ``[b, S]`` and grads
    ``[b, S, e]``) or ``"rows"`` (per-sample rows ``[b, width]``).
    """

    kind: str
    factors: list[_Factor]
    params: list[Tensor] | None = None
    weight: Tensor | None = None

    def gramian(self) -> Tensor:
        pieces = [f.gathered for f in self.factors]
        assert all(p is not None for p in pieces)
        if self.kind == "rows":
            rows = pieces[0]
            return rows_gramian(rows.unsqueeze(1)).reshape(rows.shape[0], rows.shape[0])
        if self.kind == "linear":
            inputs, grads = pieces  # [B, S, d], [B, S, o]
            assert self.params is not None and self.weight is not None
            square = weight_and_bias_gramian(inputs, grads.unsqueeze(0), self.params, self.weight)
        else:
            index, grads = pieces  # [B, S], [B, S, e]
            flat = index.reshape(-1)
            kernel = (flat[:, None] == flat[None, :]).to(grads.dtype)
            b, s = index.shape
            square = gramian_from_kernel(kernel.view(b, s, b, s), grads.unsqueeze(0))
        return square.reshape(square.shape[0], square.shape[0])


def _rows_term(rows: Tensor) -> _Term:
    """Rows ``[b, T, ...]`` with ``b = 1`` or ``T = 1``: one row per local loss."""
    count = rows.shape[0] * rows.shape[1]
    return _Term("rows", [_Factor(rows.reshape(count, -1))])


def _rule_terms(rule: LayerRule, params: list[Tensor]) -> list[_Term]:
    """The terms of one rule's (untied) shared parameters, in per-sample mode (``T = 1``)."""
    weight = getattr(rule.call.module, "weight", None)
    if isinstance(rule, (LinearRule, ConvRule)):
        inputs, grads = rule.inputs, rule.grads[0]  # [b, S, d], [b, S, o]
        s, d, o = inputs.shape[1], inputs.shape[2], grads.shape[2]
        if any(p is weight for p in params) and s * (d + o) <= o * d:
            return [_Term("linear", [_Factor(inputs), _Factor(grads)], params, weight)]
        return [_rows_term(rows) for rows in rule.jacobians(params)]
    if isinstance(rule, EmbeddingRule):
        return [_Term("embedding", [_Factor(rule.index), _Factor(rule.grads[0])])]
    return [_rows_term(rows) for rows in rule.jacobians(params)]


class DistributedGramianUpdate(DistributedJacobianUpdate):
    """The exact distributed update of the Gramian engine for per-sample losses (module docs).

    Args:
        modules: the modules to hook (as ``JDOptimizer(modules=...)``).
        group: the process group (``None``: the default group).
        timeout: as for :class:`DistributedJacobianUpdate`.
        check_replicas: as for :class:`DistributedJacobianUpdate`.

    :attr:`last_stats` and :attr:`last_plain_ddp_bytes` are as for the explicit-Jacobian path.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        group: dist.ProcessGroup | None = None,
        *,
        timeout: datetime.timedelta | None = None,
        check_replicas: bool = True,
    ) -> None:
        super().__init__(group, per_sample=True, timeout=timeout, check_replicas=check_replicas)
        self.engine = Engine(*modules, batch_dim=0)
        self.task_update = DistributedJacobianUpdate(
            group, per_sample=False, timeout=timeout, check_replicas=check_replicas
        )
        self.task_update.comm = self.comm  # one set of counters for the step

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        if batch.separate is not None:  # task losses: the explicit-Jacobian task path
            result = self.task_update.compute(batch, plan, aggregator)
            self.last_stats = self.task_update.last_stats
            self.last_plain_ddp_bytes = self.task_update.last_plain_ddp_bytes
            return result
        if not isinstance(aggregator, GramianWeightedAggregator):
            return super().compute(batch, plan, aggregator)  # needs all of J: explicit path
        shared = list(plan.shared)
        step, error = None, _specific_per_sample(plan)
        try:  # a local failure is reported to every process by the signature's all-gather
            if error is None:
                step = self.engine.step(batch.vector, shared, [], per_sample=True)
        except Exception as exc:
            error = exc
        sizes = self._check_signature(batch.m, shared, [], error).tolist()
        assert step is not None
        self._sync_aggregator(aggregator)
        dtype = gramian_dtype(batch.vector.dtype, shared)  # at least the parameters' precision
        with torch.no_grad():
            gramian = self._global_gramian(step, sizes).to(dtype)
            weights = gramian_weights(aggregator, gramian)  # refuses a non-finite Gramian
            weights = self.comm.broadcast("weights", weights.to(dtype).contiguous())
            start = sum(sizes[: self.rank])
            local, _ = step.gradients(weights[start : start + sizes[self.rank]])
            shared_grads = self._sum_gradients(local)
        extras = self._finish_stats(shared, dtype)
        return UpdateResult(shared_grads, [], weights, gramian, extras)

    # -- the factor exchange ----------------------------------------------------------------

    def _terms(self, step: GramianStep) -> list[_Term]:
        """What this process contributes to the global Gramian, as factors to gather."""
        terms: list[_Term] = []
        per_sample = step.batch_dim is not None  # else explicit parameters: b = 1, T = B_r
        for rule, _, _, alone, _ in step.rule_parameters:
            if alone:
                if per_sample:
                    terms.extend(_rule_terms(rule, alone))
                else:
                    terms.extend(_rows_term(rows) for rows in rule.jacobians(alone))
        terms.extend(_rows_term(rows) for rows in step.shared_rows())
        return terms

    def _global_gramian(self, step: GramianStep, sizes: list[int]) -> Tensor:
        terms = self._terms(step)
        factors = [f for term in terms for f in term.factors]
        floats = [f for f in factors if f.local.is_floating_point()]
        integers = [f for f in factors if not f.local.is_floating_point()]
        for group in (floats, integers):
            if group:
                self._gather(group, sizes)
        gramian: Tensor | None = None
        for term in terms:
            part = term.gramian()
            gramian = part if gramian is None else gramian + part
        if gramian is None:
            return torch.zeros(sum(sizes), sum(sizes))
        return gramian

    def _gather(self, factors: list[_Factor], sizes: list[int]) -> None:
        """All-gather ``factors`` along the sample dimension (per-rank sizes ``sizes``) as one
        all-to-all of the packed local factors, repeated for every destination."""
        b = sizes[self.rank]
        dtype = factors[0].local.dtype
        for factor in factors[1:]:
            dtype = torch.promote_types(dtype, factor.local.dtype)
        packed = torch.cat([f.local.reshape(b, -1).to(dtype) for f in factors], dim=1)
        n = self.world_size
        send = packed.repeat(n, 1)  # the chunk for rank k is our own [b, W] block
        received = self.comm.all_to_all("factors", send, [b] * n, sizes)  # [B, W]
        offset = 0
        for factor in factors:
            width = math.prod(factor.local.shape[1:])
            piece = received[:, offset : offset + width]
            factor.gathered = piece.reshape(-1, *factor.local.shape[1:]).to(factor.local.dtype)
            offset += width

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
