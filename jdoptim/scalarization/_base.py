r"""The base class of the scalarizers: a module that maps a tensor of values (the losses) to one
scalar, whose gradient is then taken with one ordinary backward.

A call ``s = scalarizer(values)`` runs three steps, which :class:`jdoptim.JDOptimizer` also runs
one by one so that a step it refuses changes nothing:

1. :meth:`Scalarizer._check` — validate ``values`` (shape, sign) against the method's settings;
2. :meth:`Scalarizer._scalarize` — compute ``s`` as a differentiable function of ``values`` (and
   of the method's learnable parameters), without changing any state;
3. :meth:`Scalarizer._observe` — record what the call saw (epoch sums, previous losses, warm-up
   statistics) in the method's state.

The *effective weight* of value ``i`` is ``∂s/∂ℓᵢ``: the gradient of the scalarized loss with
respect to the parameters is ``Σᵢ (∂s/∂ℓᵢ) ∇ℓᵢ``, so a scalarizer is a (loss-dependent) weighting
of the per-loss gradients that never needs those gradients.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

__all__ = ["Scalarizer", "check_same_shape"]


def check_same_shape(tensor: Tensor | None, values: Tensor, name: str, owner: str) -> None:
    """Raise a ``ValueError`` unless ``tensor`` is ``None`` or has the shape of ``values``."""
    if tensor is not None and tensor.shape != values.shape:
        raise ValueError(
            f"{owner}: `{name}` has shape {tuple(tensor.shape)} but the values have shape "
            f"{tuple(values.shape)}; give one entry of `{name}` per value (loss)."
        )


def check_values(values: object, owner: str) -> Tensor:
    """Raise a clear error unless ``values`` is a non-empty floating-point tensor."""
    if not isinstance(values, Tensor):
        raise TypeError(
            f"{owner} scalarizes a tensor of values, got a {type(values).__name__}: stack the "
            "losses first, e.g. torch.stack([loss1, loss2])."
        )
    if not values.is_floating_point():
        raise TypeError(f"{owner}: the values have dtype {values.dtype}; use floating point.")
    if values.numel() == 0:
        raise ValueError(f"{owner}: got an empty tensor of values; give at least one.")
    return values


class Scalarizer(nn.Module, ABC):
    """Maps a tensor of values of any shape (typically the vector of losses) to one scalar.

    Same call convention as ``torchjd.scalarization.Scalarizer``: ``scalarizer(values)`` returns
    a 0-dimensional tensor whose ``backward()`` trains the model.
    """

    def __call__(self, values: Tensor, /) -> Tensor:
        check_values(values, type(self).__name__)
        return super().__call__(values)

    def forward(self, values: Tensor, /) -> Tensor:
        self._check(values)
        result = self._scalarize(values)
        self._observe(values.detach())
        return result

    def _check(self, values: Tensor) -> None:
        """Raise a clear error if the method cannot scalarize ``values``; change nothing."""

    @abstractmethod
    def _scalarize(self, values: Tensor) -> Tensor:
        """The scalarization of ``values``: differentiable, and without side effects on the
        method's state (except a random method's draw)."""

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """``s`` and the effective weights ``w = ∂s/∂ℓ`` in closed form, computed without
        autograd (for methods whose weights have a simple formula, as FAMO's), or ``None``: then
        ``w`` comes from differentiating :meth:`_scalarize`. :class:`jdoptim.JDOptimizer` then
        runs one backward of ``Σᵢ wᵢ ℓᵢ``, with no autograd node of the method's own. A method
        with learnable parameters also gives :meth:`_learned_gradients`."""
        return None

    def _learned_gradients(self, values: Tensor) -> list[Tensor] | None:
        """``∂s/∂φ`` for each of :meth:`learnable_parameters` ``φ`` in closed form (with
        :meth:`_value_and_weights`), or ``None``: then autograd differentiates
        :meth:`_scalarize`."""
        return None

    def _observe(self, values: Tensor) -> None:
        """Record a call on the (detached) ``values`` in the method's state."""

    def learnable_parameters(self) -> list[nn.Parameter]:
        """The parameters learned jointly with the model by descent on the scalarized loss (UW's
        and IMTL-L's log-scales). :class:`jdoptim.JDOptimizer` trains them; FAMO's logits are
        not among them (FAMO updates them itself, in :meth:`FAMO.update`)."""
        return []

    def end_epoch(self) -> None:
        """Close an epoch (DWA rolls its loss history); nothing for methods without epochs."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"
