"""Reproducible randomness for randomised aggregators and weightings.

Randomised methods (PCGrad's projection order, GradVac's order, GradDrop's thresholds, RLW's
weights) draw from their own CPU :class:`torch.Generator`, never from the global RNG, so that

* two instances built with the same ``seed`` produce the same trajectory;
* the generator's state is part of ``state_dict()`` (through ``get_extra_state``), so that a
  checkpoint restored mid-training resumes the exact same random stream;
* :meth:`~jdoptim.aggregation.Stateful.reset` rewinds the stream to its state at construction.

The samples are drawn on the CPU and then moved to the input's device, so that results do not
depend on the device either.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import CheckpointedState

_SEED_BOUND = 2**62


class _SeededRandomness(CheckpointedState):
    """Owns a CPU ``torch.Generator``; used as a mixin by randomised methods. The generator's
    state is declared state (:mod:`jdoptim.aggregation.state`): checkpointed, synchronised from
    rank 0, and rewound to its state at construction by ``reset()``."""

    _generator: torch.Generator

    def _init_generator(self, seed: int | None, generator: torch.Generator | None) -> None:
        """Build (or adopt) the generator.

        Args:
            seed: seed of a fresh generator. ``None`` (and no ``generator``) draws the seed from
                the global RNG, so that ``torch.manual_seed`` makes runs reproducible.
            generator: a CPU generator to use (and advance) instead of a fresh one.
        """
        if seed is not None and generator is not None:
            raise ValueError("Give either `seed` or `generator`, not both.")
        if generator is None:
            if seed is None:
                seed = int(torch.randint(0, _SEED_BOUND, (1,)).item())
            if not isinstance(seed, int) or isinstance(seed, bool):
                raise TypeError(f"`seed` must be an int, got {type(seed).__name__}.")
            generator = torch.Generator(device="cpu")
            generator.manual_seed(seed)
        elif not isinstance(generator, torch.Generator):
            raise TypeError(
                f"`generator` must be a torch.Generator, got {type(generator).__name__}."
            )
        elif generator.device.type != "cpu":
            raise ValueError(
                f"`generator` must be a CPU generator (samples are drawn on the CPU and then moved "
                f"to the input's device), got one on {generator.device}."
            )
        self._generator = generator
        self.declare_state("_generator_state", generator.get_state())

    @property
    def _generator_state(self) -> Tensor:
        """The generator's state: declared state (key ``"generator_state"``), read and written
        through the generator itself, so that a generator given by the user keeps its identity."""
        return self._generator.get_state()

    @_generator_state.setter
    def _generator_state(self, state: Tensor) -> None:
        self._generator.set_state(state)

    def _random_orders(self, m: int, order: str, device: torch.device) -> Tensor:
        """Return an ``[m, m]`` integer matrix whose row ``i`` is the order in which task ``i``
        visits the tasks: a fresh uniform permutation per row (``"random"``) or ``0, …, m-1``
        (``"fixed"``). Rows include ``i`` itself; callers skip it."""
        if order == "fixed":
            return torch.arange(m, device=device).expand(m, m)
        keys = torch.rand(m, m, generator=self._generator)
        return keys.argsort(dim=1).to(device)


def check_order(order: str) -> None:
    if order not in ("random", "fixed"):
        raise ValueError(f"`order` must be 'random' or 'fixed', got {order!r}.")


def check_reduction(reduction: str) -> None:
    if reduction not in ("sum", "mean"):
        raise ValueError(f"`reduction` must be 'sum' or 'mean', got {reduction!r}.")
