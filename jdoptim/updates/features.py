r"""Representation-level JD: ``opt.step(losses, features=z)``.

The weights come from the Gramian of the losses' gradients with respect to a shared
representation ``z`` (the trunk's output) instead of the shared parameters (Sener & Koltun, 2018,
"Multi-Task Learning as Multi-Objective Optimization", NeurIPS: MGDA-UB; LibMTL's
``rep_grad=True``):

.. math::  Z = \begin{pmatrix} \partial ℓ_1/\partial z \\ ⋮ \\ \partial ℓ_m/\partial z
           \end{pmatrix} ∈ R^{m × |z|}, \qquad w = W(Z Zᵀ),

(row ``i`` of ``Z`` is ``∂ℓᵢ/∂z`` flattened, over the whole batch), then

* every shared parameter gets ``Σᵢ wᵢ ∇ℓᵢ``, from one backward pass of ``Σᵢ wᵢ ℓᵢ``;
* every specific parameter (a head, reached by one loss) gets its own loss's gradient, from one
  backward pass of ``Σᵢ ℓᵢ`` that stops at the heads (autograd only runs the nodes that lead to
  the parameters asked for); with ``scope="all"`` there is no such pass.

``Z`` comes from one batched backward from the losses to ``z`` (through the heads only), so the
step costs about a plain step plus the heads' share of the backward, whatever the trunk's size.

**What is and is not guaranteed.** The update *is* ``Σᵢ wᵢ ∇ℓᵢ`` exactly, for the weights ``w``
that were used (``StepRecord.weights``). But ``w`` comes from ``Z``, a different Jacobian from
``J`` (the gradients over the shared parameters): ``J = Z ∂z/∂θ`` when every loss reaches the
trunk through ``z`` only, and ``Z Zᵀ ≠ J Jᵀ`` in general. Hence a property that a method proves
about ``Jᵀw`` with ``w = W(JJᵀ)`` (UPGrad's and MGDA's non-conflict ``J d ≥ 0``, IMTL-G's equal
projections, …) holds for the *features'* gradients (``Z Zᵀ w ≥ 0`` for UPGrad), not for the
parameters' gradients. Sener & Koltun's bound: MGDA on ``Z`` minimises an upper bound of MGDA's
objective on ``J`` (``‖Jᵀw‖ ≤ ‖∂z/∂θ‖ ‖Zᵀw‖``), and when ``∂z/∂θ`` has full rank the
MGDA-UB direction is still a descent direction for every loss (their Theorem 1) — only MGDA's
guarantee carries over, and only in that bound's sense. ``StepRecord.gramian`` is ``Z Zᵀ`` (so the
monitoring properties describe the features' gradients), and ``record.extras["features"]`` is
``True``.

Every Gramian-based method works in this mode, including those that also need the loss values;
methods that need the Jacobian itself (DB-MTL, MoCo, GradDrop, …) and cross-batch ones are
refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..aggregation import Aggregator, GramianWeightedAggregator
from ..introspection import HeadsMap, map_heads
from ..linalg.vmap_fallback import batched_vjp
from ..losses import LossBatch
from ..parameter_plan import ParameterPlan
from .base import UpdateResult, ensure_finite, weigh

__all__ = ["FeaturesUpdate", "HeadsMap", "check_features", "map_heads"]


def check_features(features: object) -> Tensor:
    """Raise a clear error unless ``features`` is a floating tensor computed with a graph."""
    if not isinstance(features, Tensor):
        raise TypeError(
            f"features must be the shared representation tensor z (e.g. the trunk's output), "
            f"got {type(features).__name__}."
        )
    if not features.is_floating_point() or features.grad_fn is None:
        raise ValueError(
            "features must be a floating-point tensor computed by the model, with a graph "
            "(requires_grad and a grad_fn): pass the trunk's output z that the losses were "
            "computed from, not a detached copy or a leaf."
        )
    return features


def feature_jacobian(losses: Tensor, features: Tensor) -> Tensor:
    """``Z ∈ R^{m×|z|}``, row ``i`` the flattened ``∂ℓᵢ/∂z`` (the graph is kept)."""
    m = losses.shape[0]
    eye = torch.eye(m, dtype=losses.dtype, device=losses.device)
    (rows,) = batched_vjp([losses], [features], [eye], retain_graph=True)
    if rows is None:
        raise ValueError(
            "No loss depends on features: pass the representation z that the losses were "
            "computed from (e.g. z = trunk(x); losses = [head(z) for head in heads])."
        )
    return rows.reshape(m, -1)


def _own_inputs(plan: ParameterPlan, m: int) -> list[list[int]]:
    own: list[list[int]] = [[] for _ in range(m)]
    for k, (_, index) in enumerate(plan.specific):
        own[index].append(k)
    return own


def _stack_rows(rows: list[Tensor | None], features: Tensor) -> Tensor:
    if all(row is None for row in rows):
        raise ValueError(
            "No loss depends on features: pass the representation z that the losses were "
            "computed from (e.g. z = trunk(x); losses = [head(z) for head in heads])."
        )
    stacked = torch.stack([torch.zeros_like(features) if r is None else r for r in rows])
    return stacked.reshape(len(rows), -1)


def per_loss_pass(
    batch: LossBatch, plan: ParameterPlan, features: Tensor
) -> tuple[Tensor, list[Tensor]]:
    """``Z`` and the specific parameters' own gradients, one backward per loss (graph kept)."""
    assert batch.separate is not None
    own = _own_inputs(plan, batch.m)
    specific_grads: list[Tensor] = [torch.empty(0)] * len(plan.specific)
    rows: list[Tensor | None] = []
    for index, loss in enumerate(batch.separate):
        inputs = [features] + [plan.specific[k][0] for k in own[index]]
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(grads[0])
        for k, grad in zip(own[index], grads[1:]):
            param = plan.specific[k][0]
            specific_grads[k] = torch.zeros_like(param) if grad is None else grad
    return _stack_rows(rows, features), specific_grads


def _rows_add_up(rows: Tensor, total: Tensor) -> bool:
    """Whether ``Σᵢ Zᵢ`` is the pass's own gradient of ``z`` up to rounding:
    ``‖Σᵢ Zᵢ − ∇z‖ ≤ τ √m ‖Z‖_F`` (``√m ‖Z‖_F ≥ Σᵢ ‖Zᵢ‖`` bounds the rounding of the ``m``
    additions, ``τ = max(10⁻⁵, 10 m ε)``; a missed or doubled contribution moves the sum by a
    whole row, seen unless that row is below the rounding itself). A non-finite sum fails it.
    Two reductions and one synchronisation. (That every loss's consumers sent a gradient is
    checked apart, exactly.)"""
    m = rows.shape[0]
    with torch.no_grad():
        gap = torch.dist(rows.sum(dim=0), total.reshape(-1).to(rows.dtype))
        gap, norm = torch.stack((gap, torch.linalg.vector_norm(rows))).tolist()
    tolerance = max(1e-5, 10 * m * torch.finfo(rows.dtype).eps)
    return bool(gap <= tolerance * math.sqrt(m) * norm + 1e-30)


def one_heads_pass(
    batch: LossBatch, plan: ParameterPlan, features: Tensor, heads: HeadsMap
) -> tuple[Tensor, list[Tensor]] | None:
    """``Z`` and the specific gradients from one backward of ``Σᵢ ℓᵢ`` through the heads.

    Hooks on the consumers of ``z`` catch what each sends to ``z``; with exclusive heads,
    consumer nodes of loss ``i`` carry ``∂ℓᵢ/∂z`` only, so their sum is row ``i`` of ``Z``. The
    rows must add up to the pass's own gradient of ``z``; ``None`` (use :func:`per_loss_pass`)
    when they do not.
    """
    assert batch.separate is not None
    caught: list[Tensor | None] = [None] * batch.m

    def catcher(index: int, slots: list[int]) -> Callable:
        def hook(grad_inputs: tuple[Tensor | None, ...], _: object) -> None:
            for slot in slots:
                grad = grad_inputs[slot]
                if grad is not None:
                    previous = caught[index]
                    caught[index] = grad if previous is None else previous + grad

        return hook

    handles = [node.register_hook(catcher(i, s)) for node, (i, s) in heads.consumers.items()]
    specific = [param for param, _ in plan.specific]
    try:
        grads = torch.autograd.grad(
            list(batch.separate), [features, *specific], retain_graph=True, allow_unused=True
        )
    finally:
        for handle in handles:
            handle.remove()
    if any(caught[index] is None for index, _ in heads.consumers.values()):
        return None  # a consumer of z sent nothing back: take one backward per loss
    rows = _stack_rows(caught, features)
    total = grads[0]
    if total is None or not _rows_add_up(rows, total):
        return None
    specific_grads = [
        torch.zeros_like(param) if grad is None else grad
        for param, grad in zip(specific, grads[1:])
    ]
    return rows, specific_grads


class FeaturesUpdate:
    """The update computer of one ``features=`` step (see the module docstring).

    With separately given losses and separate heads, one backward of ``Σᵢ ℓᵢ`` through the heads
    gives ``Z`` and the heads' gradients (:func:`one_heads_pass`; else one backward per loss);
    then, when no shared parameter is reached around ``z`` (:func:`map_heads`), the shared
    gradients are one backward of ``z`` alone with the output gradient ``Σᵢ wᵢ Zᵢ``, which
    equals ``Σᵢ wᵢ ∇ℓᵢ`` because every path from a loss to them passes through ``z``; otherwise
    (a skip connection, ``scope="all"``, one 1-D tensor of losses) one backward of ``Σᵢ wᵢ ℓᵢ``.
    """

    def __init__(self, features: Tensor) -> None:
        self.features = check_features(features)

    def compute(
        self, batch: LossBatch, plan: ParameterPlan, aggregator: Aggregator
    ) -> UpdateResult:
        if not isinstance(aggregator, GramianWeightedAggregator):
            raise TypeError(
                f"features= weighs the losses by the Gramian of their gradients with respect to "
                f"z, so it needs a Gramian-based method; {type(aggregator).__name__} needs the "
                "Jacobian. Use a Weighting-based method (UPGrad, MGDA, IMTLG, ...) or drop "
                "features=."
            )
        shared = list(plan.shared)
        heads = plan.heads  # the plan's walk of the heads, when it was made for these features
        if heads is None or heads.cut != (self.features.grad_fn, self.features.output_nr):
            roots = list(batch.separate) if batch.separate is not None else [batch.vector]
            heads = map_heads(roots, self.features)
        specific_grads: list[Tensor]
        if batch.separate is None:  # one 1-D tensor of losses: every reached parameter is shared
            rows, specific_grads = feature_jacobian(batch.vector, self.features), []
        else:
            fast = one_heads_pass(batch, plan, self.features, heads) if heads.exclusive else None
            rows, specific_grads = fast or per_loss_pass(batch, plan, self.features)
        with torch.no_grad():
            gramian = rows @ rows.T
        ensure_finite(gramian, "Gramian with respect to the features")
        weights = weigh(aggregator.weighting, gramian)
        shared_grads = self._shared_grads(batch, shared, weights, rows, heads) if shared else []
        extras: dict[str, object] = {"features": True}
        return UpdateResult(shared_grads, specific_grads, weights, gramian, extras=extras)

    def _shared_grads(
        self,
        batch: LossBatch,
        shared: list[Tensor],
        weights: Tensor,
        rows: Tensor,
        heads: HeadsMap,
    ) -> list[Tensor]:
        weights = weights.detach().to(dtype=batch.vector.dtype)
        if any(id(param) in heads.around for param in shared):
            return list(torch.autograd.grad(batch.vector, shared, weights, materialize_grads=True))
        with torch.no_grad():
            output_grad = (weights @ rows).view_as(self.features)
        return list(torch.autograd.grad(self.features, shared, output_grad, materialize_grads=True))
