r"""Scalarizers' arithmetic on a few numbers, in Python floats.

A loss-only step's own work is a few dozen operations on ``m`` numbers (the losses, a method's
logits or preferences). As tensor operations, each costs a dispatch of several microseconds, and
inside a training step (caches cold after the model's backward) 10–20 µs: 0.2–0.5 ms of a step
that budgets 1 ms. In Python floats (double precision) the same arithmetic takes a few
microseconds; one read per tensor (``tolist``) and one tensor made at the end replace it. The
closed forms (``Scalarizer._value_and_weights``) are taken up to :data:`FLOAT_LIMIT` losses
(``jdoptim.updates.scalarized`` checks it), FAMO's logit update up to that many logits.
"""

from __future__ import annotations

import array
import math
from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["FLOAT_LIMIT", "floats", "softmax", "tensor_of", "value_and_weights"]

#: Up to this many losses, the step takes the scalarizers' closed forms (and FAMO updates its
#: logits) in floats; beyond, autograd (and FAMO's tensor operations).
FLOAT_LIMIT = 64


def tensor_of(numbers: list[float], like: Tensor) -> Tensor:
    """A 1-D tensor of ``numbers`` in ``like``'s dtype and device: made from an ``array`` buffer
    for float32 and float64 (about a quarter of ``torch.tensor``'s time from a list)."""
    code = {torch.float32: "f", torch.float64: "d"}.get(like.dtype)
    if code is None:
        return torch.tensor(numbers, dtype=like.dtype, device=like.device)
    tensor = torch.frombuffer(array.array(code, numbers), dtype=like.dtype)
    return tensor if like.device.type == "cpu" else tensor.to(like.device)


def floats(tensor: Tensor) -> list[float]:
    """The entries of ``tensor`` as a flat list of floats."""
    return (tensor if tensor.dim() == 1 else tensor.reshape(-1)).tolist()


def softmax(logits: list[float]) -> list[float]:
    """``softmax`` of a list of floats (shifted by the largest, so no ``exp`` overflows)."""
    top = max(logits)
    exps = [math.exp(w - top) for w in logits]
    total = math.fsum(exps)
    return [e / total for e in exps]


def value_and_weights(
    value: float, weights: Iterable[float], like: Tensor
) -> tuple[Tensor, Tensor]:
    """``s`` (0-d) and ``w`` (in ``like``'s shape), in ``like``'s dtype and device, from one
    tensor made of both."""
    packed = tensor_of([value, *weights], like)
    return packed[0], packed[1:].view(like.shape)
