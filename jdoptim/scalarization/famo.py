r"""FAMO: fast adaptive multitask optimization, balancing the losses' rates of decrease from the
loss values alone.

Liu, Feng, Stone & Liu, 2023, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS.

With the task weights ``z = softmax(w)`` (``w`` the logits, starting at ``0``), the lower bounds
``b`` (``min_losses``, ``0`` by default) and ``ε = 10⁻⁸``, the scalarized loss is

.. math::  s = c \sum_i z_i \log(\ell_i - b_i + \epsilon), \qquad
           c = \Big(\sum_i \frac{z_i}{\ell_i - b_i + \epsilon}\Big)^{-1},

with ``z`` and ``c`` constants of the gradient, so the effective weight of loss ``i`` is
``c zᵢ / (ℓᵢ − bᵢ + ε)`` (positive, summing to ``1``): a convex combination of the gradients of
the log-losses.

**Logit update** (:meth:`FAMO.update`). After the model step, with the losses ``ℓ'`` recomputed
on the same batch, ``δᵢ = log(ℓᵢ − bᵢ + ε) − log(ℓ'ᵢ − bᵢ + ε)`` (how much each log-loss fell), and
the logits take one Adam step (learning rate ``lr = 0.025``, weight decay ``1e-3``, the paper's
Algorithm 2; the official code uses ``1e-5``) along the gradient ``(∂z/∂w)ᵀ δ = z ⊙ (δ − zᵀδ)``. The
Adam is FAMO's own, and its state is in ``state_dict()``.

Differences from TorchJD: :meth:`update` consumes the losses stored by the last call (a second
:meth:`update` without a call in between is refused); values at or below ``b − ε`` (whose logarithm
is undefined) are refused instead of producing NaN.

With :class:`jdoptim.JDOptimizer`: given a ``closure``, the step recomputes the losses on the same
batch after the model update and calls :meth:`update` (the paper's algorithm, one extra forward);
given the losses, the update is deferred to the next step, which uses that step's losses (a new
batch) as ``ℓ'`` — no extra forward, but ``δ`` then also holds the change between batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Adam

from ..aggregation._mixins import Stateful
from ..aggregation.state import CheckpointedState
from . import _floats
from ._base import Scalarizer, check_values
from ._floats import floats, softmax, tensor_of, value_and_weights

_EPSILON = 1e-8


class FAMO(CheckpointedState, Stateful, Scalarizer):
    r"""``s = c Σᵢ zᵢ log(ℓᵢ − bᵢ + ε)`` with learned task weights (see the module docstring).

    Args:
        shape: the shape of the values (an int ``m`` is ``(m,)``).
        min_losses: the lower bounds ``b`` (shape ``shape``); ``None``: zeros.
        lr: the learning rate ``≥ 0`` of the logits' Adam.
        weight_decay: the weight decay ``≥ 0`` of the logits' Adam.
    """

    min_losses: Tensor

    def __init__(
        self,
        shape: int | Sequence[int],
        min_losses: Tensor | None = None,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
    ) -> None:
        super().__init__()
        if not lr >= 0.0:
            raise ValueError(f"FAMO: `lr` must be non-negative, got {lr}.")
        if not weight_decay >= 0.0:
            raise ValueError(f"FAMO: `weight_decay` must be non-negative, got {weight_decay}.")
        self.logits: nn.Parameter
        self.declare_state("logits", nn.Parameter(torch.zeros(shape)))
        if min_losses is None:
            min_losses = torch.zeros(self.logits.shape)
        elif min_losses.shape != self.logits.shape:
            raise ValueError(
                f"FAMO: `min_losses` has shape {tuple(min_losses.shape)}, expected "
                f"{tuple(self.logits.shape)} (one lower bound per loss)."
            )
        self.register_buffer("min_losses", min_losses)
        self.lr, self.weight_decay = lr, weight_decay
        self._optimizer = Adam([self.logits], lr=lr, weight_decay=weight_decay)
        # A fresh Adam's state (no moments, the given settings) is the default of "adam".
        self.declare_state("_adam_state", self._optimizer.state_dict(), key="adam")
        self._previous: Tensor | None  # the losses of the last call, until update()
        self.declare_state("_previous", None)

    def task_weights(self) -> Tensor:
        """``z = softmax(w)``, detached, in the shape of the values."""
        return self.logits.detach().reshape(-1).softmax(dim=0).reshape(self.logits.shape)

    @property
    def pending_update(self) -> bool:
        """Whether a call's losses wait for :meth:`update`."""
        return self._previous is not None

    def _check(self, values: Tensor) -> None:
        if values.shape != self.logits.shape:
            raise ValueError(
                f"FAMO was built for values of shape {tuple(self.logits.shape)} (one logit per "
                f"loss) but got shape {tuple(values.shape)}: build it with FAMO(number_of_losses)."
            )
        if values.device != self.logits.device:
            raise ValueError(
                f"FAMO's logits are on {self.logits.device} but the values on {values.device}: "
                "move it with .to(device) before the first call."
            )
        if _lowest_margin(values.detach(), self.min_losses) <= -_EPSILON:
            raise ValueError(
                "FAMO takes log(loss - min_losses): every loss must stay above its lower bound "
                "`min_losses` (zeros by default, i.e. positive losses); pass lower bounds that "
                "hold, e.g. FAMO(m, min_losses=torch.full((m,), -1.0))."
            )

    def _scalarize(self, values: Tensor) -> Tensor:
        z = self.task_weights().to(dtype=values.dtype, device=values.device)
        shifted = values - self.min_losses + _EPSILON
        normaliser = (z / shifted.detach()).sum()
        return (z * shifted.log()).sum() / normaliser

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor]:
        """``s`` and its effective weights ``c zᵢ / (ℓᵢ − bᵢ + ε)`` (``z`` and ``c`` constants
        of the gradient), in floats, with no autograd graph."""
        now, bounds, logits = map(floats, (values.detach(), self.min_losses, self.logits.detach()))
        z = softmax(logits)
        shifted = [n - b + _EPSILON for n, b in zip(now, bounds)]
        ratios = [zi / si for zi, si in zip(z, shifted)]
        normaliser = math.fsum(ratios)
        value = math.fsum(zi * math.log(si) for zi, si in zip(z, shifted)) / normaliser
        return value_and_weights(value, (r / normaliser for r in ratios), values)

    def _observe(self, values: Tensor) -> None:
        self._previous = values.clone()

    def update(self, values: Tensor, /) -> None:
        """One Adam step on the logits from the change of the losses across the model step:
        ``values`` are the losses recomputed (on the same batch) after the model update."""
        if self._previous is None:
            raise ValueError(
                "FAMO.update needs the losses of a call before the model step: call the "
                "scalarizer on the losses first (and update once per call)."
            )
        check_values(values, "FAMO.update")
        self._check(values)
        self._apply_update(values)

    def _apply_update(self, values: Tensor) -> Callable[[], None]:
        """:meth:`update` on values already checked (shape, device, above the bounds); returns
        how to undo it (for a step refused after the update).

        Up to :data:`~jdoptim.scalarization._floats.FLOAT_LIMIT` logits, the update runs on
        Python floats (in double precision, see :mod:`jdoptim.scalarization._floats`): its
        twenty-odd operations on ``m`` numbers then cost a few microseconds instead of one
        tensor operation each."""
        pending = self._previous
        assert pending is not None
        if self.logits.numel() <= _floats.FLOAT_LIMIT:
            undo_state = self._update_in_floats(values)
        else:
            undo_state = self._update_in_tensors(values)
        self._previous = None

        def undo() -> None:
            undo_state()
            self._previous = pending

        return undo

    def _update_in_tensors(self, values: Tensor) -> Callable[[], None]:
        assert self._previous is not None
        snapshot = self._snapshot()
        before = (self._previous - self.min_losses + _EPSILON).log()
        after = (values.detach() - self.min_losses + _EPSILON).log()
        delta = (before - after).reshape(-1).to(self.logits.dtype)
        z = self.task_weights().reshape(-1)
        grad = (z * (delta - (z * delta).sum())).reshape(self.logits.shape)
        self._adam_step(grad)
        return lambda: self._restore(snapshot)

    def _update_in_floats(self, values: Tensor) -> Callable[[], None]:
        """The logit update of :meth:`_update_in_tensors` (and :meth:`_adam_step`) in floats:
        one read of each tensor it needs, one write of the logits and of each moment."""
        assert self._previous is not None
        param = self.logits
        state = self._optimizer.state[param]
        tensors = [self._previous, values.detach(), self.min_losses, param.detach()]
        fresh = not state  # Adam's state is created by this first update
        if state:
            tensors += [state["exp_avg"], state["exp_avg_sq"]]
        previous, now, bounds, logits, *moments = map(floats, tensors)
        first, second = moments or ([0.0] * len(logits), [0.0] * len(logits))
        step = float(state["step"]) if state else 0.0
        delta = [
            math.log(p - b + _EPSILON) - math.log(n - b + _EPSILON)
            for p, n, b in zip(previous, now, bounds)
        ]
        z = softmax(logits)
        mean_delta = math.fsum(zi * di for zi, di in zip(z, delta))
        grad = [zi * (di - mean_delta) for zi, di in zip(z, delta)]
        group = self._optimizer.param_groups[0]
        self._write_state(*_adam_in_floats(group, logits, grad, first, second, step + 1), step + 1)

        def undo() -> None:
            self._write_state(logits, first, second, step)
            if fresh:
                self._optimizer.state.pop(param, None)

        return undo

    def _adam_step(self, grad: Tensor) -> None:
        r"""One Adam step (Kingma & Ba, with L2 weight decay ``λ`` added to the gradient, as
        ``torch.optim.Adam``) of the logits, on the moments held in ``self._optimizer``'s state
        (so its ``state_dict`` is unchanged):

        .. math::  g = ∇ + λw,\quad m ← β_1 m + (1-β_1) g,\quad v ← β_2 v + (1-β_2) g^2,\quad
                   w ← w - \frac{η}{1-β_1^t}\, \frac{m}{\sqrt{v/(1-β_2^t)} + ε} .

        Written out because ``Optimizer.step``'s machinery costs about ten times these eight
        operations on ``m`` numbers, a visible share of a loss-only step.
        """
        group = self._optimizer.param_groups[0]
        (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
        state = self._optimizer.state[self.logits]
        if not state:
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(0.0, dtype=scalar)
            state["exp_avg"] = torch.zeros_like(self.logits, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(self.logits, memory_format=torch.preserve_format)
        with torch.no_grad():
            if group["weight_decay"]:
                grad = grad.add(self.logits, alpha=group["weight_decay"])
            state["step"] += 1
            step = float(state["step"])
            state["exp_avg"].lerp_(grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
            self.logits.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))

    def _write_state(
        self, logits: list[float], first: list[float], second: list[float], step: float
    ) -> None:
        """Set the logits (in place) and Adam's moments and step count (new tensors: views of
        one buffer, which cost one operation to make)."""
        param = self.logits
        rows = tensor_of([*logits, *first, *second], param)
        new_logits, exp_avg, exp_avg_sq = rows.view(3, *param.shape).unbind(0)
        with torch.no_grad():
            param.copy_(new_logits)
        state = self._optimizer.state[param]
        state["exp_avg"], state["exp_avg_sq"] = exp_avg, exp_avg_sq
        if "step" in state:
            state["step"].fill_(step)
        else:
            scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            state["step"] = torch.tensor(step, dtype=scalar)

    @property
    def _adam_state(self) -> dict[str, Any]:
        """The logits' Adam state (declared state, key ``"adam"``), read and written through
        the Adam itself, which keeps its identity."""
        return self._optimizer.state_dict()

    @_adam_state.setter
    def _adam_state(self, state: dict[str, Any]) -> None:
        self._optimizer.load_state_dict(state)

    def _snapshot(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The logits and the Adam state's tensors, copied (to undo an update)."""
        state = self._optimizer.state.get(self.logits, {})
        moments = {key: value.clone() for key, value in state.items()}
        return self.logits.detach().clone(), moments

    def _restore(self, snapshot: tuple[Tensor, dict[str, Tensor]]) -> None:
        logits, moments = snapshot
        with torch.no_grad():
            self.logits.copy_(logits)
        if moments:
            self._optimizer.state[self.logits] = moments
        else:
            self._optimizer.state.pop(self.logits, None)

    def extra_repr(self) -> str:
        return f"shape={tuple(self.logits.shape)}, lr={self.lr}, weight_decay={self.weight_decay}"


def _lowest_margin(values: Tensor, bounds: Tensor) -> float:
    """``min(values − bounds)``, in floats up to :data:`~jdoptim.scalarization._floats.FLOAT_LIMIT`
    values (a NaN value is no violation here: the finiteness checks refuse it)."""
    if values.numel() > _floats.FLOAT_LIMIT:
        return float((values - bounds).min())
    return min(v - b for v, b in zip(floats(values), floats(bounds)))


def _adam_in_floats(
    group: dict[str, Any],
    logits: list[float],
    grad: list[float],
    first: list[float],
    second: list[float],
    step: float,
) -> tuple[list[float], list[float], list[float]]:
    """Step ``step`` of Adam (the formula of :meth:`FAMO._adam_step`) on floats: the new logits
    and first and second moments."""
    (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
    decay = group["weight_decay"]
    grad = [g + decay * w for g, w in zip(grad, logits)] if decay else grad
    first = [m + (1 - beta1) * (g - m) for m, g in zip(first, grad)]
    second = [beta2 * v + (1 - beta2) * g * g for v, g in zip(second, grad)]
    correction, size = math.sqrt(1 - beta2**step), lr / (1 - beta1**step)
    logits = [
        w - size * m / (math.sqrt(v) / correction + eps) for w, m, v in zip(logits, first, second)
    ]
    return logits, first, second
