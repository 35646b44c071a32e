"""The record of one JD step, returned by :meth:`JDOptimizer.step` and kept as ``last_record``.

Design note: what a step measures has a type. The traffic of a distributed step is a
:class:`CommunicationStats` on ``StepRecord.communication`` (it travels from the update computer
as ``UpdateResult.stats``); ``StepRecord.extras`` stays a plain dict for what a method adds about
itself (``"features"``, ``"cross"``, ``"scalarized_loss"``, …), and repeats the communication
figures under their former keys (``"bytes_sent"``, ``"plain_ddp_bytes"``, ``"world_size"``) for
compatibility only.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["CommunicationStats", "StepRecord"]


@dataclass(frozen=True)
class CommunicationStats:
    r"""What one distributed JD step sent, on this process (see :mod:`jdoptim.distributed`).

    The byte counts follow the ring / pairwise cost model of :mod:`jdoptim.distributed._comm`
    (an all-reduce of ``S`` bytes over ``N`` processes sends ``2 S (N-1)/N``, an all-gather of
    ``S`` bytes per process ``S (N-1)``, …).

    Attributes:
        world_size: the number of processes ``N``.
        bytes_sent: the bytes this process sent in the step's collectives.
        plain_ddp_bytes: what a plain DDP step sends for the same parameters: one ring
            all-reduce of their gradients, ``2 n e (N-1)/N`` bytes (``n`` entries of ``e``
            bytes).
        calls: one ``(phase, collective, bytes)`` entry per collective, in order.
    """

    world_size: int
    bytes_sent: int
    plain_ddp_bytes: int
    calls: tuple[tuple[str, str, int], ...] = ()

    def count(self, collective: str) -> int:
        """How many collectives of this kind (``"all_gather"``, ``"all_reduce"``, …) ran."""
        return self.collectives[collective]

    @property
    def collectives(self) -> Counter[str]:
        """The number of collectives of each kind."""
        return Counter(collective for _, collective, _ in self.calls)

    @property
    def all_gathers(self) -> int:
        return self.count("all_gather")

    @property
    def ratio_to_ddp(self) -> float:
        """``bytes_sent / plain_ddp_bytes`` (``nan`` when a plain DDP step sends nothing)."""
        if self.plain_ddp_bytes == 0:
            return float("nan")
        return self.bytes_sent / self.plain_ddp_bytes

    def as_extras(self) -> dict[str, object]:
        """The entries ``StepRecord.extras`` held before this type existed (compatibility)."""
        return {
            "bytes_sent": self.bytes_sent,
            "plain_ddp_bytes": self.plain_ddp_bytes,
            "world_size": self.world_size,
        }


@dataclass
class StepRecord:
    """What one step did.

    Attributes:
        names: the losses' names (mapping keys, or ``"loss[i]"``).
        losses: the losses' values, detached.
        weights: one weight per loss when the aggregator is Gramian-weighted (``d = Σᵢ wᵢ gᵢ``
            over the shared parameters), else ``None``. With a scalarizer
            (:mod:`jdoptim.scalarization`), the effective weights ``wᵢ = ∂s/∂ℓᵢ`` of the
            scalarized loss ``s`` (its gradient is ``Σᵢ wᵢ ∇ℓᵢ``), and ``extras["scalarized_loss"]``
            is ``s``.
        gramian: ``G = J Jᵀ`` of the losses' Jacobian over the shared parameters (``None`` when no
            parameter is shared).
        shared, specific, foreign, unreached: the parameters by treatment (see
            :mod:`jdoptim.parameter_plan`); ``specific`` holds ``(parameter, loss index)`` pairs.
        idle_losses: the names of the losses (given separately) that reach none of the wrapped
            optimizer's parameters (only parameters it does not own, or none): they cannot
            change the update (a warning says so once per optimizer).
        skipped: ``True`` when the step changed nothing (``nonfinite="skip"``, or a
            ``GradScaler`` that found an overflow), with ``reason``.
        communication: with ``process_group``, what this process sent in the step
            (:class:`CommunicationStats`); ``None`` otherwise.
        extras: what the method adds about itself (``"features"``, ``"cross"``,
            ``"scalarized_loss"``, ``"famo_update"``). With ``process_group`` it also repeats
            ``communication``'s ``"bytes_sent"``, ``"plain_ddp_bytes"`` and ``"world_size"``:
            these three entries are kept for compatibility only (read ``communication``).

    Monitoring properties (computed on access from ``gramian`` and ``weights``, see
    :mod:`jdoptim.monitoring`): ``cosine_similarities``, ``conflicting_pairs``, ``update_norm``,
    ``directional_derivatives``.
    """

    names: tuple[str, ...]
    losses: Tensor
    weights: Tensor | None = None
    gramian: Tensor | None = None
    shared: tuple[Tensor, ...] = ()
    specific: tuple[tuple[Tensor, int], ...] = ()
    foreign: tuple[Tensor, ...] = ()
    unreached: tuple[Tensor, ...] = ()
    idle_losses: tuple[str, ...] = ()
    skipped: bool = False
    reason: str | None = None
    communication: CommunicationStats | None = None
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def weights_by_name(self) -> dict[str, float] | None:
        """The weights as a ``{name: weight}`` dict, for logging."""
        if self.weights is None:
            return None
        return dict(zip(self.names, self.weights.tolist()))

    @property
    def losses_by_name(self) -> dict[str, float]:
        """The losses' values as a ``{name: value}`` dict, for logging."""
        return dict(zip(self.names, self.losses.tolist()))

    # Monitoring (see jdoptim.monitoring): computed on access, from the Gramian and the weights
    # the step already holds. Over the shared parameters.

    @property
    def cosine_similarities(self) -> Tensor | None:
        """``cos(gᵢ, gⱼ)`` of the losses' gradients, ``m × m`` (``None`` without a Gramian)."""
        from .monitoring import cosine_similarities

        return None if self.gramian is None else cosine_similarities(self.gramian)

    @property
    def conflicting_pairs(self) -> int | None:
        """How many pairs of losses have conflicting gradients (``gᵢ · gⱼ < 0``)."""
        from .monitoring import conflicting_pairs

        return None if self.gramian is None else conflicting_pairs(self.gramian)

    @property
    def update_norm(self) -> Tensor | None:
        """``‖d‖ = √(wᵀ G w)`` (``None`` unless the aggregator is Gramian-weighted)."""
        from .monitoring import update_norm

        if self.gramian is None or self.weights is None:
            return None
        return update_norm(self.gramian, self.weights)

    @property
    def directional_derivatives(self) -> Tensor | None:
        """``J d = G w``: each loss's derivative along the update (``≥ 0``: no conflict)."""
        from .monitoring import directional_derivatives

        if self.gramian is None or self.weights is None:
            return None
        return directional_derivatives(self.gramian, self.weights)
