"""Bit-for-bit snapshots of everything a JD step may change: parameters, ``.grad``, the wrapped
optimizer's state and the aggregator's state (buffers and extra state, generators included)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer


def snapshot(model: nn.Module, opt: JDOptimizer) -> dict[str, Any]:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "optimizer": copy.deepcopy(opt.optimizer.state_dict()),
        "aggregator": copy.deepcopy(opt.aggregator.state_dict()),
    }


def same(a: object, b: object) -> bool:
    """Bit-for-bit equality of nested dicts/lists/tuples of tensors and plain values (NaNs in
    the same places count as equal)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            nan = a.isnan()
            return bool(torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan]))
        return bool(torch.equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (
            isinstance(b, (list, tuple))
            and len(a) == len(b)
            and all(same(x, y) for x, y in zip(a, b))
        )
    return a == b


def assert_unchanged(model: nn.Module, opt: JDOptimizer, before: dict[str, Any]) -> None:
    now = snapshot(model, opt)
    for key in ("params", "grads", "optimizer", "aggregator"):
        assert same(now[key], before[key]), f"the step changed the {key}"
