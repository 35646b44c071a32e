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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

__all__ = ["VmapState", "vmap_or_loop"]

R = TypeVar("R")


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
        return batched(False)
    try:
        result = batched(True)
    except (RuntimeError, NotImplementedError):
        state.works = False
        return looped()
    state.works = True
    return result
