"""The record of one JD step, returned by :meth:`JDOptimizer.step` and kept as ``last_record``."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class StepRecord:
    """What one step did.

    Attributes:
        names: the losses' names (mapping keys, or ``"loss[i]"``).
        losses: the losses' values, detached.
        weights: one weight per loss when the aggregator is Gramian-weighted (``d = Σᵢ wᵢ gᵢ``
            over the shared parameters), else ``None``.
        gramian: ``G = J Jᵀ`` of the losses' Jacobian over the shared parameters (``None`` when no
            parameter is shared).
        shared, specific, foreign, unreached: the parameters by treatment (see
            :mod:`jdoptim.parameter_plan`); ``specific`` holds ``(parameter, loss index)`` pairs.
        skipped: ``True`` when the step changed nothing (``nonfinite="skip"``), with ``reason``.
    """

    names: tuple[str, ...]
    losses: Tensor
    weights: Tensor | None = None
    gramian: Tensor | None = None
    shared: tuple[Tensor, ...] = ()
    specific: tuple[tuple[Tensor, int], ...] = ()
    foreign: tuple[Tensor, ...] = ()
    unreached: tuple[Tensor, ...] = ()
    skipped: bool = False
    reason: str | None = None
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def weights_by_name(self) -> dict[str, float] | None:
        """The weights as a ``{name: weight}`` dict, for logging."""
        if self.weights is None:
            return None
        return dict(zip(self.names, self.weights.tolist()))
