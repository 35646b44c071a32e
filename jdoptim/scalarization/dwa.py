r"""DWA: dynamic weight average, weights from how fast each loss fell over the last two epochs.

Liu, Johns & Davison, 2019, "End-to-End Multi-Task Learning with Attention", CVPR.

During epoch ``t``, the losses are combined as

.. math::  s = \sum_k \lambda_k(t)\, \ell_k, \qquad
           \lambda_k(t) = \frac{K \exp(r_k / T)}{\sum_i \exp(r_i / T)}, \qquad
           r_k = \frac{L_k(t-1)}{L_k(t-2)} ,

where ``L_k(t)`` is the average of loss ``k`` over the calls of epoch ``t``, ``K`` the number of
losses (so that ``Σ λ = K``) and ``T`` the temperature (``2.0``, the paper's). The ``λ`` are
constants of the gradient (they come from past epochs). Until two epochs are complete,
``λ = 1``. Each call adds the (detached) losses to the current epoch's sums.

**Epochs.** Call :meth:`DWA.step` once at the end of each epoch (TorchJD's convention; with
:class:`jdoptim.JDOptimizer`, ``opt.end_epoch()``), or build ``DWA(window=n)`` to close an epoch
automatically every ``n`` calls (then :meth:`step` is refused: the window owns the epochs). The
averages are in ``state_dict()``. The ratio needs non-zero averages of consistent sign; an
average of ``0`` makes it undefined, which is refused when the epoch closes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..aggregation._mixins import Stateful
from ..aggregation.state import CheckpointedState
from ._base import Scalarizer


def _lambdas(older: Tensor, newer: Tensor, temperature: float) -> Tensor:
    rates = (newer / older).reshape(-1)
    if not bool(torch.isfinite(rates).all()):
        raise ValueError(
            "DWA: an epoch-average loss is 0 (or not finite), so the descending rate "
            "L(t-1)/L(t-2) is undefined; DWA needs losses that stay away from 0."
        )
    return (rates.numel() * torch.softmax(rates / temperature, dim=0)).reshape(newer.shape)


class DWA(CheckpointedState, Stateful, Scalarizer):
    r"""``s = Σ_k λ_k(t) ℓ_k`` (see the module docstring). Stateful.

    Args:
        temperature: ``T > 0`` (larger: more uniform weights).
        window: close an epoch automatically every ``window`` calls (``None``: by :meth:`step`).
    """

    def __init__(self, temperature: float = 2.0, *, window: int | None = None) -> None:
        super().__init__()
        if not temperature > 0.0:
            raise ValueError(f"DWA: `temperature` must be strictly positive, got {temperature}.")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"DWA: `window` must be a positive int or None, got {window!r}.")
        self.temperature = temperature
        self.window = window
        self._sum: Tensor | None  # the current epoch's sum of the values
        self._count: int  # the current epoch's number of calls
        self._averages: list[Tensor]  # the last two complete epochs' average values
        self._lambdas: Tensor | None  # λ(t), derived from _averages (not saved)
        self.declare_state("_sum", None)
        self.declare_state("_count", 0, convert=int)
        self.declare_state("_averages", [])
        self.declare_state("_lambdas", None, persistent=False)

    def current_weights(self) -> Tensor | None:
        """The ``λ(t)`` of the current epoch (``None`` while they are all ``1``)."""
        return self._lambdas

    def _check(self, values: Tensor) -> None:
        known = self._sum if self._sum is not None else self._lambdas
        if known is not None and known.shape != values.shape:
            raise ValueError(
                f"DWA: the values have shape {tuple(values.shape)}, but earlier calls had shape "
                f"{tuple(known.shape)}; call reset() before changing the number of losses."
            )
        if self.window is not None and self._count + 1 == self.window and self._averages:
            average = values.detach() if self._sum is None else self._sum + values.detach()
            _lambdas(self._averages[-1], average / self.window, self.temperature)

    def _scalarize(self, values: Tensor) -> Tensor:
        if self._lambdas is None:
            return values.sum()
        return (self._lambdas.to(dtype=values.dtype, device=values.device) * values).sum()

    def _observe(self, values: Tensor) -> None:
        self._sum = values.clone() if self._sum is None else self._sum + values
        self._count += 1
        if self.window is not None and self._count == self.window:
            self._roll()

    def step(self) -> None:
        """Close the current epoch: its average loss becomes ``L(t-1)`` (nothing if it saw no
        call)."""
        if self.window is not None:
            raise RuntimeError(
                f"DWA(window={self.window}) closes its epochs itself every {self.window} calls; "
                "do not also call step() / end_epoch()."
            )
        self._roll()

    def end_epoch(self) -> None:
        self.step()

    def _roll(self) -> None:
        if self._sum is None:
            return
        average = self._sum / self._count
        lambdas = None
        if self._averages:
            lambdas = _lambdas(self._averages[-1], average, self.temperature)  # may refuse
        self._averages = [*self._averages, average][-2:]
        self._lambdas, self._sum, self._count = lambdas, None, 0

    def _derived_state(self, loaded: dict[str, Any]) -> dict[str, Any]:
        """``λ(t)`` from the loaded averages (a load refused by :func:`_lambdas` changes
        nothing)."""
        averages = loaded["_averages"]
        lambdas = None
        if len(averages) == 2:
            lambdas = _lambdas(averages[0], averages[1], self.temperature)
        return {"_lambdas": lambdas}

    def extra_repr(self) -> str:
        window = "" if self.window is None else f", window={self.window}"
        return f"temperature={self.temperature}{window}"
