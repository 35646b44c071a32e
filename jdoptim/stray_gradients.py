"""Gradients a step's backward pass writes outside the losses' graph: found, undone, refused.

A JD step differentiates the losses with ``torch.autograd.grad``, which returns the gradients of
the parameters the losses' autograd graph reaches and writes no ``.grad``. Code whose backward
runs a backward pass of its own breaks that: a custom ``torch.autograd.Function`` that recomputes
its layers in ``backward`` and calls ``torch.autograd.backward`` there (transformers' Reformer,
whose reversible layers do this to save activations) accumulates gradients into the ``.grad`` of
parameters that the outer graph never shows. A plain ``loss.backward()`` trains them that way;
a JD step cannot, since it needs each parameter's gradient *per loss*, which such code never
exposes: the graph walk reports the parameters as unreached, and the inner backward pass leaves
in their ``.grad`` a sum over whatever rows the step's backward ran, which the wrapped optimizer
would then apply. Silently wrong, so the optimizer (and :meth:`~jdoptim.autogram.Engine.
compute_gramian`) watches the ``.grad`` of the parameters its plan finds unreached (usually none,
so the watch costs nothing), and refuses a step that wrote into one, after restoring it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

__all__ = ["StrayGradientWatch", "parameter_names", "stray_gradients_message"]


class StrayGradientWatch:
    """The ``.grad`` of ``params`` as it was when made (the tensor, its version counter, and a
    copy of its values: a write may be in place), to find and undo what a step wrote there.

    Only parameters that require gradients are watched (no backward pass writes the others)."""

    def __init__(self, params: Iterable[Tensor]) -> None:
        self._watched: list[tuple[Tensor, Tensor | None, int, Tensor | None]] = []
        for p in params:
            if not p.requires_grad:
                continue
            grad = p.grad
            if grad is None:
                self._watched.append((p, None, -1, None))
            else:
                self._watched.append((p, grad, grad._version, grad.detach().clone()))

    def written(self) -> list[Tensor]:
        """The watched parameters whose ``.grad`` is another tensor, or was changed in place."""
        return [
            p
            for p, grad, version, _ in self._watched
            if p.grad is not grad or (grad is not None and grad._version != version)
        ]

    def restore(self) -> None:
        """Each written ``.grad`` as it was (the same tensor, with its values)."""
        for p, grad, version, values in self._watched:
            if p.grad is grad and (grad is None or grad._version == version):
                continue
            if grad is not None and values is not None:
                grad.detach().copy_(values)
            p.grad = grad


def stray_gradients_message(names: str) -> str:
    """Why a step whose backward pass wrote into ``names``' ``.grad`` is refused, and the fix."""
    return (
        f"The step's backward pass wrote gradients into the .grad of {names}, which the losses' "
        "autograd graph does not reach: code whose backward runs a backward pass of its own "
        "(a custom torch.autograd.Function that recomputes its layers and calls "
        "torch.autograd.backward, as the reversible layers of transformers' Reformer do) or a "
        "hook that writes .grad. JD needs each parameter's gradient per loss, which such code "
        "does not expose, so it cannot update these parameters. Nothing was changed (their .grad "
        "is as it was). Fix: use a model without such layers, or give these parameters to a "
        "separate optimizer trained with a summed loss and leave them out of this one."
    )


def parameter_names(
    params: Sequence[Tensor],
    groups: Sequence[dict[str, Any]] = (),
    labels: dict[int, str] | None = None,
    most: int = 6,
) -> str:
    """How a message names ``params``: by ``labels`` (their paths in the model, by id), else by
    the optimizer's ``groups`` (torch's ``param_names`` where the optimizer was given named
    parameters, else the place in ``param_groups`` and the shape); the first ``most`` of them."""
    labels = labels or {}
    places: dict[int, str] = {}
    for g, group in enumerate(groups):
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            place = f"'{names[i]}'" if names else f"param_groups[{g}]['params'][{i}]"
            places.setdefault(id(p), f"{place} {tuple(p.shape)}")
    named = [labels.get(id(p)) or places.get(id(p)) or f"a {tuple(p.shape)} tensor" for p in params]
    more = f" and {len(named) - most} more" if len(named) > most else ""
    return ", ".join(named[:most]) + more
