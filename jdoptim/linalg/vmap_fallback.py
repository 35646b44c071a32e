"""One batched computation by ``vmap``, or a loop where ``vmap`` cannot run.

A batched backward (``torch.autograd.grad(..., is_grads_batched=True)``, or ``torch.func.vmap``
of a pullback) computes ``R`` vector-Jacobian products for about the cost of a few, but an
operation without a batching rule makes it raise (``RuntimeError`` or ``NotImplementedError``).
Then the same ``R`` products are computed one at a time, which is exact, only slower.

:func:`vmap_or_loop` is that choice, made once per :class:`VmapState`:

* not tried yet (``works is None``): the batched call runs *probing* (it must leave the graph
  usable, so that the loop can still run if it fails); its success or failure is remembered;
* known to work: the batched call runs without probing (it may free the graph as it goes), and
  an error it raises is a real error, which propagates;
* known to fail: the loop runs directly.

Without a state (``state=None``) every call probes afresh and nothing is remembered.

Inside ``vmap``, torch itself runs an operator that has no batching rule one row at a time and
says so, once per operator, with a ``UserWarning`` ("There is a performance drop because we have
not yet implemented the batching rule for aten::…"; met on the CPU backward of
``scaled_dot_product_attention`` and on weight norm's backward). Those products are exact, and
the notice asks for an issue on torch's tracker, which a user of this library cannot act on: the
batched computations here run under :func:`fallback_notice_silenced`, which ignores that one
warning (and nothing else) for their duration.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["VmapState", "batched_vjp", "fallback_notice_silenced", "vmap_or_loop"]

R = TypeVar("R")

#: the start of torch's notice that ``vmap`` runs an operator one row at a time
FALLBACK_NOTICE = "There is a performance drop because we have not yet implemented the batching"


@contextmanager
def fallback_notice_silenced() -> Iterator[None]:
    """Ignore torch's per-operator ``vmap`` fallback notice (module docstring) in this block;
    every other warning is shown as the caller's filters say."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=FALLBACK_NOTICE, category=UserWarning)
        yield


@dataclass
class VmapState:
    """Whether the batched computation works on this model: ``None`` (not tried yet),
    ``True`` or ``False``."""

    works: bool | None = None


def vmap_or_loop(
    batched: Callable[[bool], R], looped: Callable[[], R], state: VmapState | None = None
) -> R:
    """``batched(probing)``, or ``looped()`` where the batched computation cannot run.

    Args:
        batched: the batched computation; its argument says whether this is a probe, after which
            the graph must still be usable by ``looped``.
        looped: the same result, one row at a time.
        state: what is known about the batched computation; updated here.
    """
    state = VmapState() if state is None else state
    if state.works is False:
        return looped()
    if state.works:
        with fallback_notice_silenced():
            return batched(False)
    try:
        with fallback_notice_silenced():
            result = batched(True)
    except (RuntimeError, NotImplementedError):
        state.works = False
        return looped()
    state.works = True
    return result


def batched_vjp(
    outputs: Sequence[Any],
    inputs: Sequence[Any],
    cotangents: Sequence[Tensor],
    retain_graph: bool,
    state: VmapState | None = None,
) -> list[Tensor | None]:
    """``R`` vector-Jacobian products of ``outputs`` (tensors or gradient edges) with respect to
    ``inputs`` (tensors or edges), each row of ``cotangents`` (``[R, *output shape]``, one per
    output) a row of its own: ``[R, *input shape]`` per input, ``None`` where unreached. One
    batched backward pass (``is_grads_batched``), or one backward per row where it cannot run
    (:func:`vmap_or_loop`); a single row is a plain backward. The graph is kept only with
    ``retain_graph``."""
    if not inputs:
        return []
    rows = cotangents[0].shape[0]
    if rows == 1:
        grads = torch.autograd.grad(
            outputs,
            inputs,
            [c[0] for c in cotangents],
            retain_graph=retain_graph,
            allow_unused=True,
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]

    def at_once(probing: bool) -> list[Tensor | None]:
        return list(
            torch.autograd.grad(
                outputs,
                inputs,
                cotangents,
                retain_graph=retain_graph or probing,
                allow_unused=True,
                is_grads_batched=True,
            )
        )

    def looped() -> list[Tensor | None]:
        found = [
            torch.autograd.grad(
                outputs,
                inputs,
                [c[r] for c in cotangents],
                retain_graph=retain_graph or r < rows - 1,
                allow_unused=True,
            )
            for r in range(rows)
        ]
        return [_stacked([f[i] for f in found]) for i in range(len(inputs))]

    return vmap_or_loop(at_once, looped, state)


def _stacked(rows: list[Tensor | None]) -> Tensor | None:
    """The rows stacked, zeros for the unreached ones (``None`` if none was reached)."""
    like = next((r for r in rows if r is not None), None)
    if like is None:
        return None
    return torch.stack([torch.zeros_like(like) if r is None else r for r in rows])
