"""Mixins shared by aggregators and weightings."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch


class _NonDifferentiable:
    """Runs ``__call__`` under :func:`torch.no_grad`.

    For methods whose output is not a differentiable function of their input (QP solutions,
    projections chosen by sign tests, argmins). It must come *before* ``nn.Module`` (and before
    :class:`~jdoptim.aggregation.Aggregator` / :class:`~jdoptim.aggregation.Weighting`) in the
    bases, so that its ``__call__`` wraps theirs::

        class UPGradWeighting(_NonDifferentiable, Weighting): ...
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return super().__call__(*args, **kwargs)  # type: ignore[misc]


class Stateful(ABC):
    """A method whose output depends on past calls (EMAs, cached weights, random generators).

    Its state lives in buffers or in ``get_extra_state``/``set_extra_state`` so that
    ``state_dict()``/``load_state_dict()`` restore the exact trajectory; :meth:`reset` returns it
    to the state it had at construction.
    """

    @abstractmethod
    def reset(self) -> None:
        """Forget every past call: the next call behaves as the first after construction."""
