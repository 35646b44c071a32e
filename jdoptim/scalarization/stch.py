r"""STCH: smooth Tchebycheff scalarization, with an optional warm-up that estimates the ideal point.

Lin, Zhang, Yang, Zhang & Zhang, 2024, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML, arXiv:2402.19078.

.. math::  s = \mu \log \sum_{i=1}^m \exp\!\Big(\frac{\lambda_i (\ell_i - z_i^*)}{\mu}\Big),

a smooth upper bound of the Tchebycheff scalarization ``maxᵢ λᵢ(ℓᵢ − zᵢ*)`` (tighter as the
smoothing ``μ`` decreases: ``max ≤ s ≤ max + μ log m``). ``λ`` (``weights``) defaults to the
uniform ``1/m``; ``z*`` (``reference``, the ideal point) to no shift. The effective weights are
``λᵢ softmax(λ ⊙ (ℓ − z*)/μ)ᵢ``: the worst-off loss dominates. It is computed as
``μ logsumexp((y − max y)/μ) + max y`` with ``y = λ ⊙ (ℓ − z*)`` (Appendix B.1 of the paper), which
cannot overflow for small ``μ``; ``max y`` is a constant of the gradient, which is exactly the
softmax above.

**Warm-up for the ideal point** (``warmup_steps = k > 0``, not in TorchJD): ``z*`` is rarely
known. For the first ``k`` calls, STCH returns the linear scalarization ``Σᵢ λᵢ ℓᵢ`` and records the
smallest value seen of each loss; from call ``k + 1`` on, that running minimum is ``z*``, fixed
(the classical estimate of the ideal point in decomposition methods: the best value found of each
objective). The official multi-task code instead averages the losses over a warm-up *epoch* and
scalarizes ``log(ℓᵢ / nadirᵢ)``; that variant is not this one. The warm-up statistics are in
``state_dict()``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..aggregation._mixins import Stateful
from ..aggregation.state import CheckpointedState
from ._base import Scalarizer, check_same_shape
from ._floats import floats, value_and_weights


class STCH(CheckpointedState, Stateful, Scalarizer):
    r"""``s = μ log Σᵢ exp(λᵢ(ℓᵢ − zᵢ*)/μ)`` (see the module docstring).

    Args:
        mu: the smoothing ``μ > 0`` (the paper evaluates ``0.01`` to ``1``; no default).
        weights: the preference ``λ`` (same shape as the values); ``None``: ``1/m`` each.
        reference: the ideal point ``z*`` (same shape as the values); ``None``: no shift, or the
            warm-up's estimate when ``warmup_steps > 0``.
        warmup_steps: number of first calls that use ``Σᵢ λᵢ ℓᵢ`` and estimate ``z*`` as the
            running minimum of each loss (``0``: no warm-up).
    """

    def __init__(
        self,
        mu: float,
        weights: Tensor | None = None,
        reference: Tensor | None = None,
        *,
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        if not mu > 0.0:
            raise ValueError(f"STCH: `mu` must be strictly positive, got {mu}.")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
            raise ValueError(f"STCH: `warmup_steps` must be an int >= 0, got {warmup_steps!r}.")
        if warmup_steps and reference is not None:
            raise ValueError(
                "STCH: give either `reference` (a known ideal point) or `warmup_steps` (to "
                "estimate it), not both."
            )
        self.mu = mu
        self.weights = weights
        self.reference = reference
        self.warmup_steps = warmup_steps
        self._seen: int  # warm-up calls seen
        self._running_min: Tensor | None  # the warm-up's running minimum of the values
        self.declare_state("_seen", 0, convert=int)
        self.declare_state("_running_min", None)

    @property
    def warming_up(self) -> bool:
        """Whether the next call is a warm-up call (linear scalarization)."""
        return self._seen < self.warmup_steps

    def ideal_point(self) -> Tensor | None:
        """The ``z*`` in use: ``reference``, or the warm-up's estimate once it is complete."""
        if self.reference is not None or self.warmup_steps == 0:
            return self.reference
        return None if self.warming_up else self._running_min

    def _check(self, values: Tensor) -> None:
        check_same_shape(self.weights, values, "weights", "STCH")
        check_same_shape(self.reference, values, "reference", "STCH")
        check_same_shape(self._running_min, values, "the warm-up's running minimum", "STCH")

    def _scalarize(self, values: Tensor) -> Tensor:
        if self.weights is None:
            weights = torch.full_like(values, 1.0 / values.numel())
        else:
            weights = self.weights
        if self.warming_up:
            return (weights * values).sum()
        ideal = self.ideal_point()
        y = weights * (values if ideal is None else values - ideal)
        top = y.detach().max()
        return self.mu * torch.logsumexp(((y - top) / self.mu).reshape(-1), dim=0) + top

    def _value_and_weights(self, values: Tensor) -> tuple[Tensor, Tensor] | None:
        """``s`` and ``w = λ ⊙ softmax(y/μ)`` (``λ`` during the warm-up), in floats."""
        losses = floats(values.detach())
        m = len(losses)
        preference = [1.0 / m] * m if self.weights is None else floats(self.weights)
        if self.warming_up:
            value = math.fsum(p * v for p, v in zip(preference, losses))
            return value_and_weights(value, preference, values)
        ideal = self.ideal_point()
        shifted = losses if ideal is None else [v - z for v, z in zip(losses, floats(ideal))]
        y = [p * f for p, f in zip(preference, shifted)]
        top = max(y)
        exps = [math.exp((yi - top) / self.mu) for yi in y]
        total = math.fsum(exps)
        weights = [p * e / total for p, e in zip(preference, exps)]
        return value_and_weights(self.mu * math.log(total) + top, weights, values)

    def _observe(self, values: Tensor) -> None:
        if not self.warming_up:
            return
        if self._running_min is None:
            self._running_min = values.clone()
        else:
            self._running_min = torch.minimum(self._running_min, values)
        self._seen += 1

    def extra_repr(self) -> str:
        return (
            f"mu={self.mu}, weights={self.weights!r}, reference={self.reference!r}, "
            f"warmup_steps={self.warmup_steps}"
        )
