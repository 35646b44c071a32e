"""Normalisation and validation of the losses given to :meth:`JDOptimizer.step`."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd.graph import Node

from .linalg.finite import is_finite

__all__ = [
    "LossBatch",
    "StaleGraphError",
    "check_not_stepped",
    "mark_stepped",
    "parse_losses",
    "translate_graph_error",
]

#: Key, in the ``metadata`` of a loss's ``grad_fn``, that marks losses a step has consumed.
_STEPPED = "jdoptim.stepped"


@dataclass(frozen=True)
class LossBatch:
    """The losses of one step.

    Attributes:
        vector: the ``m`` losses as one 1-D tensor, carrying their autograd graph.
        names: one display name per loss (mapping keys, or ``"loss[i]"``).
        separate: the individual scalar losses when they were given separately (a sequence or a
            mapping), so that graph introspection can tell which loss reaches which parameter;
            ``None`` when one 1-D tensor was given (every reached parameter is then shared).
    """

    vector: Tensor
    names: tuple[str, ...]
    separate: tuple[Tensor, ...] | None
    #: The shape of a multi-dimensional loss tensor (e.g. ``[batch, tasks]``, accepted only by
    #: the Gramian engine); ``None`` otherwise. ``vector`` is its row-major flattening.
    shape: tuple[int, ...] | None = None
    #: The tensors the user passed (before any reshape or stack): their ``grad_fn`` nodes are
    #: the roots of the step's graph, marked once a step consumes them.
    sources: tuple[Tensor, ...] = ()

    @property
    def m(self) -> int:
        return self.vector.shape[0]


def _check_one(loss: object, name: str) -> Tensor:
    if not isinstance(loss, Tensor):
        raise TypeError(
            f"{name} is a {type(loss).__name__}, not a tensor: pass the loss tensors themselves "
            "(not `.item()` values)."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"{name} has shape {tuple(loss.shape)}, but each loss in a list or mapping must be a "
            "scalar: reduce it (e.g. `.mean()`), or pass a 1-D tensor of per-sample losses alone."
        )
    # Always a new view, even of a 0-d loss: each loss is then its own node of the graph, which
    # the graph walks (introspection, the engine's scan) take as one root per loss. Losses that
    # are outputs of one node (``list(vector)``, ``torch.unbind``) would otherwise share it.
    return loss.reshape(())


def _check_common(losses: Sequence[Tensor], names: Sequence[str]) -> None:
    for loss, name in zip(losses, names):
        if not loss.is_floating_point():
            raise TypeError(f"{name} has dtype {loss.dtype}; losses must be floating-point.")
        if not loss.requires_grad:
            raise ValueError(
                f"{name} has no autograd graph (requires_grad=False): was it computed under "
                "torch.no_grad(), detached, or from frozen parameters only? Compute it from the "
                "model's output with gradients enabled."
            )
    devices = {loss.device for loss in losses}
    if len(devices) > 1:
        found = ", ".join(f"{n} on {loss.device}" for loss, n in zip(losses, names))
        raise ValueError(
            f"The losses live on different devices ({found}): move them to one device "
            "(e.g. `loss.to(device)`) before the step."
        )
    if any(loss.is_meta for loss in losses):
        raise ValueError(
            "The losses are on the 'meta' device, which holds shapes but no values, so there is "
            "nothing to differentiate or step on: materialise the model first (e.g. "
            "`model.to_empty(device='cpu')` and initialise its parameters), then compute the "
            "losses from real data."
        )


def parse_losses(losses: object, max_dim: int = 1) -> LossBatch:
    """Validate ``losses`` and return them as a :class:`LossBatch`.

    Accepts a sequence of scalar tensors, a mapping ``name → scalar tensor``, or a 1-D tensor (or
    a 0-D tensor, one loss). Raises ``TypeError``/``ValueError`` naming the offending loss.
    With ``max_dim=2`` (the Gramian engine), a ``[batch, tasks]`` matrix is accepted too.
    """
    if isinstance(losses, Tensor) and 1 < losses.dim() <= max_dim:
        batch = parse_losses(losses.reshape(-1))
        indices = itertools.product(*(range(n) for n in losses.shape))
        names = tuple(f"loss[{', '.join(map(str, i))}]" for i in indices)
        return LossBatch(batch.vector, names, None, tuple(losses.shape), (losses,))
    if isinstance(losses, Tensor):
        if losses.dim() > 1:
            raise ValueError(
                f"Got a loss tensor of shape {tuple(losses.shape)}; expected a scalar or a 1-D "
                "tensor of losses. Reduce the other dimensions, or pass a list of scalar losses."
            )
        vector = losses.reshape(-1)
        if vector.numel() == 0:
            raise ValueError("Got an empty tensor of losses: pass at least one loss.")
        names = tuple(f"loss[{i}]" for i in range(vector.shape[0]))
        _check_common([vector], ["the loss tensor"])
        return LossBatch(vector, names, None, sources=(losses,))

    if isinstance(losses, Mapping):
        names = tuple(str(key) for key in losses)
        items = list(losses.values())
    elif isinstance(losses, Sequence) and not isinstance(losses, (str, bytes)):
        items = list(losses)
        names = tuple(f"loss[{i}]" for i in range(len(items)))
    elif callable(losses):
        raise TypeError(
            f"step() got a callable ({type(losses).__name__}) as its losses: a closure is passed "
            "by keyword, opt.step(closure=closure); it must return the losses (a list, a dict or "
            "a 1-D tensor), and runs with gradients enabled."
        )
    else:
        raise TypeError(
            f"step() got losses of type {type(losses).__name__}; pass a list of scalar loss "
            "tensors, a dict name → scalar loss, or a 1-D tensor of losses."
        )
    if not items:
        raise ValueError("step() got no losses: pass at least one loss tensor.")
    scalars = [_check_one(loss, name) for loss, name in zip(items, names)]
    _check_common(scalars, names)
    return LossBatch(torch.stack(scalars), names, tuple(scalars), sources=tuple(items))


def nonfinite_loss_names(batch: LossBatch) -> list[str]:
    """The names of the losses that are NaN or infinite (one device synchronisation when they
    are all finite)."""
    if is_finite(batch.vector):
        return []
    finite = torch.isfinite(batch.vector.detach())
    return [name for name, ok in zip(batch.names, finite.tolist()) if not ok]


# -- losses a step has already consumed ---------------------------------------------------------
#
# A step differentiates its losses, which frees their graph (or, on the first batched attempt,
# keeps it while the parameters it saved are then updated in place). Stepping on the same losses
# again would use gradients of the old parameters, silently when the graph saved none of them
# (e.g. SGD on one Linear layer). So each step marks its losses' ``grad_fn`` nodes, in the node's
# own ``metadata`` (the mark lives and dies with the graph; nothing is kept on the optimizer),
# and the next step refuses marked losses before anything changes.


class StaleGraphError(RuntimeError):
    """The losses' autograd graph was already consumed (by a step or ``backward()``) or saved
    tensors were modified in place since: the losses must be recomputed."""


def _metadata(node: Node) -> dict[Any, Any]:
    """The metadata dict of an autograd node (attached to the node, freed with the graph)."""
    # torch's Node stub declares `metadata` a method; at run time it is a dict attribute.
    return node.metadata  # type: ignore[return-value]


def check_not_stepped(batch: LossBatch) -> None:
    """Raise :class:`StaleGraphError` if a step already consumed one of ``batch``'s losses."""
    for source, name in zip(batch.sources, batch.names if batch.separate else ("the losses",)):
        node = source.grad_fn
        if node is not None and _metadata(node).get(_STEPPED):
            raise StaleGraphError(
                f"{name} was already used by a step: its graph is consumed and the parameters "
                "have changed since it was computed. Recompute the losses each step (a new "
                "forward pass), then call opt.step(losses) once on them."
            )


def mark_stepped(batch: LossBatch) -> None:
    """Mark ``batch``'s losses as consumed (see :func:`check_not_stepped`)."""
    for source in batch.sources:
        if source.grad_fn is not None:
            _metadata(source.grad_fn)[_STEPPED] = True


def translate_graph_error(error: RuntimeError) -> RuntimeError | None:
    """The library's own error for torch's graph errors, or ``None`` for other errors.

    * "backward through the graph a second time": the saved tensors were freed, by
      ``loss.backward()`` before ``opt.step(losses)`` (torch's advice, ``retain_graph=True``,
      would add the summed gradient to the JD one in ``.grad``) or by an earlier step;
    * "modified by an inplace operation": a tensor the backward needs changed after the
      forward pass, typically the parameters, by an optimizer step since the losses were
      computed;
    * "When use_reentrant=True, torch.utils.checkpoint is incompatible with .grad()": reentrant
      activation checkpointing (older transformers' default) cannot run the partial backward
      passes that a JD step needs;
    * "backward() called inside torch.vmap": a custom ``autograd.Function`` whose backward runs
      a backward pass of its own (Reformer's reversible layers), met by the batched backward
      (see :mod:`jdoptim.stray_gradients`).
    """
    text = str(error)
    if "backward() called inside torch.vmap" in text:
        return RuntimeError(
            "A custom torch.autograd.Function in the losses' graph runs a backward pass of its "
            "own in its backward (torch.autograd.backward, as the reversible layers of "
            "transformers' Reformer do), which writes gradients into .grad instead of returning "
            "them: JD needs each parameter's gradient per loss, which such code does not "
            "expose. Nothing was updated. Fix: use a model without such layers, or give their "
            "parameters to a separate optimizer trained with a summed loss."
        )
    if "use_reentrant=True" in text and "checkpoint" in text:
        return RuntimeError(
            "The model uses activation checkpointing with use_reentrant=True, which torch cannot "
            "differentiate with torch.autograd.grad (the per-loss and per-layer backward passes "
            "of a JD step). Use the non-reentrant form: "
            "torch.utils.checkpoint.checkpoint(..., use_reentrant=False), or for a transformers "
            "model model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}). Nothing was updated."
        )
    if "backward through the graph a second time" in text:
        return StaleGraphError(
            "The losses' autograd graph was already freed: by loss.backward() (opt.step(losses) "
            "replaces backward(): call only step, and do not use retain_graph=True, which would "
            "add the summed gradient to the JD one in .grad), or by an earlier step on the same "
            "losses (recompute them each step). Nothing was updated."
        )
    if "modified by an inplace operation" in text:
        return StaleGraphError(
            "A tensor that the losses' backward needs was modified in place after the losses "
            "were computed: usually the parameters, updated by an optimizer step since this "
            "forward pass (recompute the losses each step, after the previous step), or an "
            "in-place operation in the model or the loss (use its out-of-place form). Nothing "
            f"was updated. Torch's message: {text.splitlines()[0]}"
        )
    return None
