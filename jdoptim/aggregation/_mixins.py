"""Mixins shared by aggregators and weightings."""

from __future__ import annotations

from typing import Any

import torch

from .state import Stateful

__all__ = ["Stateful", "_NonDifferentiable"]


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
