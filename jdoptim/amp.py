r"""Mixed precision: ``torch.autocast`` and ``torch.amp.GradScaler`` with :class:`JDOptimizer`.

**autocast** needs nothing special: compute the losses under ``torch.autocast(...)`` and call
``opt.step(losses)`` after the block, as you would call ``backward()``. The step itself runs with
autocast disabled (the Gramian and the weights are computed in the parameters' precision).

**GradScaler** (float16 on CUDA): pass the scaler to the step, and call ``scaler.update()`` after
it, as usual::

    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        losses = compute_losses(model, batch)
    opt.zero_grad()
    record = opt.step(losses, grad_scaler=scaler)   # instead of scaler.scale(loss).backward();
    scaler.update()                                  #            scaler.step(opt)

One scaled step, with ``s = scaler.get_scale()``:

1. the Jacobian is computed from the *scaled* losses ``s·ℓᵢ`` (so that small float16 gradients do
   not underflow in the backward pass);
2. the aggregator sees the *unscaled* Gramian ``G / s²`` (or Jacobian ``J / s``), so methods that
   are not scale-invariant (Nash-MTL, CAGrad, ...) behave exactly as without scaling; if it holds
   an inf or NaN, the aggregator is not called and the update is made of NaNs;
3. the update, still multiplied by ``s``, is accumulated into ``.grad`` as ``scaler.scale(loss)
   .backward()`` would have, and ``scaler.step(optimizer)`` unscales it, checks it for inf/NaN and
   skips the wrapped optimizer's step on overflow, exactly as it does for a plain optimizer; the
   record then says ``skipped=True``. ``scaler.update()`` lowers the scale after such a step.

The record's ``gramian`` and ``weights`` are the unscaled ones. Step pre-hooks on the wrapped
optimizer (e.g. gradient clipping) run after the unscaling, as the GradScaler recipe asks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import Tensor
from torch.optim import Optimizer

from .aggregation import Aggregator, GramianWeightedAggregator, Weighting
from .losses import LossBatch

__all__ = ["LossScaling", "no_autocast", "poison_grads", "scaler_step"]


class LossScaling:
    """The loss scale of one step of a ``GradScaler``; see the module docstring."""

    def __init__(self, scale: float) -> None:
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"The loss scale must be finite and positive, got {scale!r}.")
        self.scale = scale

    @classmethod
    def of(cls, grad_scaler: object | None) -> LossScaling | None:
        """The scaling of ``grad_scaler`` for this step, or ``None`` when it is absent/disabled."""
        if grad_scaler is None:
            return None
        if not hasattr(grad_scaler, "get_scale") or not hasattr(grad_scaler, "step"):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
            )
        if not grad_scaler.is_enabled():  # type: ignore[attr-defined]
            return None
        return cls(float(grad_scaler.get_scale()))  # type: ignore[attr-defined]

    def scale_batch(self, batch: LossBatch) -> LossBatch:
        """The same losses multiplied by the scale (the graph goes through the product)."""
        separate = None if batch.separate is None else tuple(x * self.scale for x in batch.separate)
        return dataclasses.replace(batch, vector=batch.vector * self.scale, separate=separate)

    def wrap(self, aggregator: Aggregator) -> Aggregator:
        """An aggregator that takes scaled input and aggregates its unscaled version."""
        if isinstance(aggregator, GramianWeightedAggregator):
            return GramianWeightedAggregator(_UnscaledWeighting(aggregator.weighting, self.scale))
        return _UnscaledAggregator(aggregator, self.scale)

    def unscale_gramian(self, gramian: Tensor | None) -> Tensor | None:
        return None if gramian is None else gramian / self.scale**2


class _UnscaledWeighting(Weighting):
    """``w = W(G / s²)``; NaN weights (no call to ``W``) when ``G`` is not finite."""

    def __init__(self, inner: Weighting, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def __call__(self, gramian: Tensor) -> Tensor:
        return self.forward(gramian)

    def forward(self, gramian: Tensor) -> Tensor:
        if not bool(torch.isfinite(gramian).all()):
            return torch.full(gramian.shape[:1], float("nan"), dtype=gramian.dtype)
        return self.inner(gramian / self.scale**2)


class _UnscaledAggregator(Aggregator):
    """``d = s · A(J / s)``; NaNs (no call to ``A``) when ``J`` is not finite."""

    def __init__(self, inner: Aggregator, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def __call__(self, matrix: Tensor) -> Tensor:
        return self.forward(matrix)

    def forward(self, matrix: Tensor) -> Tensor:
        if not bool(torch.isfinite(matrix).all()):
            return torch.full(matrix.shape[1:], float("nan"), dtype=matrix.dtype)
        return self.inner(matrix / self.scale) * self.scale


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Disable autocast for ``device_type`` inside the block if it is enabled there."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def scaler_step(grad_scaler: object, optimizer: Optimizer, params: list[Tensor]) -> bool:
    """``grad_scaler.step(optimizer)``; returns whether it skipped the step (inf/NaN found).

    ``params`` are the parameters the JD step wrote ``.grad`` into; when their update was not
    finite (or could not be computed), their ``.grad`` holds NaNs so that the scaler records the
    overflow and skips the step, and ``scaler.update()`` lowers the scale.
    """
    with torch.no_grad():
        found_inf = not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)
    grad_scaler.step(optimizer)  # type: ignore[attr-defined]
    return found_inf


def poison_grads(params: list[Tensor]) -> None:
    """Fill the ``.grad`` of ``params`` with NaN: an overflowed scaled backward, for the scaler."""
    with torch.no_grad():
        for param in params:
            if param.grad is None:
                param.grad = torch.full_like(param, float("nan"))
            else:
                param.grad.fill_(float("nan"))
