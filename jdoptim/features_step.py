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

import torch
from torch import Tensor

from .aggregation import Aggregator, GramianWeightedAggregator
from .losses import LossBatch
from .parameter_plan import ParameterPlan
from .update import UpdateResult, ensure_finite, weigh

__all__ = ["FeaturesUpdate", "check_features"]


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
    try:
        (rows,) = torch.autograd.grad(
            losses,
            features,
            grad_outputs=torch.eye(m, dtype=losses.dtype, device=losses.device),
            retain_graph=True,
            is_grads_batched=True,
            allow_unused=True,
        )
    except (RuntimeError, NotImplementedError):  # an operation without a batching rule
        grads = [
            torch.autograd.grad(loss, features, retain_graph=True, allow_unused=True)[0]
            for loss in losses
        ]
        if all(grad is None for grad in grads):
            rows = None
        else:
            rows = torch.stack([torch.zeros_like(features) if g is None else g for g in grads])
    if rows is None:
        raise ValueError(
            "No loss depends on features: pass the representation z that the losses were "
            "computed from (e.g. z = trunk(x); losses = [head(z) for head in heads])."
        )
    return rows.reshape(m, -1)


class FeaturesUpdate:
    """The update computer of one ``features=`` step (see the module docstring)."""

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
        specific = [param for param, _ in plan.specific]
        rows = feature_jacobian(batch.vector, self.features)
        with torch.no_grad():
            gramian = rows @ rows.T
        ensure_finite(gramian, "Gramian with respect to the features")
        weights = weigh(aggregator.weighting, gramian)
        specific_grads: list[Tensor] = []
        if specific:
            ones = torch.ones_like(batch.vector)
            specific_grads = list(
                torch.autograd.grad(batch.vector, specific, ones, retain_graph=bool(shared))
            )
        shared_grads: list[Tensor] = []
        if shared:
            weighted = weights.detach().to(dtype=batch.vector.dtype)
            shared_grads = list(
                torch.autograd.grad(batch.vector, shared, weighted, materialize_grads=True)
            )
        return UpdateResult(shared_grads, specific_grads, weights, gramian, {"features": True})
