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

The Gramian of the scaled losses is ``s² G``: in float32 it overflows once ``s·‖gᵢ‖`` passes about
``1.8e19``, before the scaled gradients do. Such a step counts as an overflow (skipped, and the
scaler lowers ``s``), so the scale settles somewhat lower than with a plain backward; the default
``init_scale=2**16`` is far from that limit. The record's ``gramian`` and ``weights`` are the
unscaled ones. Step pre-hooks on the wrapped
optimizer (e.g. gradient clipping) run after the unscaling, as the GradScaler recipe asks.

**Design**: the ``GradScaler`` is a wrapper of the update computer,
:class:`jdoptim.updates.scaled.ScaledUpdate` (re-exported here); this module keeps the loss
scaling itself (:class:`LossScaling`) and what is about autocast. The scalarizers' step
(:mod:`jdoptim.updates.scalarized`) uses :class:`LossScaling` directly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .aggregation import Aggregator, GramianWeightedAggregator, Weighting
from .linalg.finite import all_finite
from .losses import LossBatch

__all__ = [
    "LossScaling",
    "no_autocast",
    "poison_grads",
    "scaler_step",
]


@runtime_checkable
class GradScalerLike(Protocol):
    """What a step uses of a ``torch.amp.GradScaler``."""

    def scale(self, outputs: Any) -> Any: ...

    def get_scale(self) -> float: ...

    def step(self, optimizer: Optimizer, *args: Any, **kwargs: Any) -> Any: ...

    def is_enabled(self) -> bool: ...


def _as_scaler(grad_scaler: object) -> GradScalerLike:
    """``grad_scaler`` if it has a GradScaler's methods, else a ``TypeError`` that says so."""
    if not isinstance(grad_scaler, GradScalerLike):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}."
        )
    return grad_scaler


class LossScaling:
    """The loss scaling of one step by a ``GradScaler``; see the module docstring.

    :meth:`scale_batch` scales the losses with ``grad_scaler.scale`` (which also initialises the
    scaler on its first use) and fixes the scale ``s`` of this step; :meth:`wrap` and
    :meth:`unscale_gramian` then undo it.
    """

    def __init__(self, grad_scaler: GradScalerLike) -> None:
        self.grad_scaler = grad_scaler
        self.scale: float | None = None

    @classmethod
    def of(cls, grad_scaler: object | None) -> LossScaling | None:
        """The scaling of ``grad_scaler``, or ``None`` when it is absent or disabled."""
        if grad_scaler is None:
            return None
        scaler = _as_scaler(grad_scaler)
        if not scaler.is_enabled():
            return None
        return cls(scaler)

    def scale_batch(self, batch: LossBatch) -> LossBatch:
        """The same losses multiplied by the scale (the graph goes through the product)."""
        vector = self.grad_scaler.scale(batch.vector)
        separate = None
        if batch.separate is not None:
            separate = tuple(self.grad_scaler.scale(loss) for loss in batch.separate)
        self.scale = float(self.grad_scaler.get_scale())
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"The loss scale must be finite and positive, got {self.scale!r}.")
        return dataclasses.replace(batch, vector=vector, separate=separate)

    def wrap(self, aggregator: Aggregator) -> Aggregator:
        """An aggregator that takes scaled input and aggregates its unscaled version."""
        scale = self._fixed_scale()
        if isinstance(aggregator, GramianWeightedAggregator):
            return GramianWeightedAggregator(_UnscaledWeighting(aggregator.weighting, scale))
        return _UnscaledAggregator(aggregator, scale)

    def unscale_gramian(self, gramian: Tensor | None) -> Tensor | None:
        return None if gramian is None else gramian / self._fixed_scale() ** 2

    def _fixed_scale(self) -> float:
        if self.scale is None:
            raise RuntimeError("LossScaling.scale_batch must be called first.")
        return self.scale


class _UnscaledWeighting(Weighting):
    """``w = W(G / s²)``. A non-finite ``G`` never gets here: the update computers refuse it
    first (:func:`jdoptim.updates.base.gramian_weights`), and the step lets the scaler skip."""

    def __init__(self, inner: Weighting, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, gramian: Tensor) -> Tensor:
        return self.inner(gramian / self.scale**2)


class _UnscaledAggregator(Aggregator):
    """``d = s · A(J / s)``. A non-finite ``J`` is refused before (see ``_UnscaledWeighting``)."""

    def __init__(self, inner: Aggregator, scale: float) -> None:
        super().__init__()
        self.inner = inner
        self.scale = scale

    def forward(self, matrix: Tensor) -> Tensor:
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
        found_inf = not all_finite([p.grad for p in params if p.grad is not None])
    _as_scaler(grad_scaler).step(optimizer)
    return found_inf


def poison_grads(params: list[Tensor]) -> None:
    """Fill the ``.grad`` of ``params`` with NaN: an overflowed scaled backward, for the scaler."""
    with torch.no_grad():
        for param in params:
            if param.grad is None:
                param.grad = torch.full_like(param, float("nan"))
            else:
                param.grad.fill_(float("nan"))


def __getattr__(name: str) -> object:
    """``ScaledUpdate`` and ``scaled`` moved to :mod:`jdoptim.updates.scaled`; they stay
    importable from here (imported on first use: that module imports this one)."""
    if name in ("ScaledUpdate", "scaled"):
        from .updates import scaled as module

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
