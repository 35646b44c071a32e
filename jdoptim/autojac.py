"""The Jacobian of a vector of losses with respect to a list of tensors.

One batched backward pass: ``torch.autograd.grad`` with ``is_grads_batched=True`` vmaps the
backward over the ``m`` rows of the identity, which costs about as much as a few ordinary
backward passes instead of ``m`` of them. Where an operation of the graph has no batching rule and
vmap refuses to run, it falls back to one ``autograd.grad`` per loss (the choice is
:func:`jdoptim.linalg.vmap_fallback.vmap_or_loop`, remembered per :class:`JacobianComputer`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .linalg.vmap_fallback import VmapState, vmap_or_loop

__all__ = ["JacobianComputer", "compute_jacobian"]


def _jacobian_by_loop(losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool) -> list[Tensor]:
    rows: list[Sequence[Tensor | None]] = []
    m = losses.shape[0]
    for index in range(m):
        keep = retain_graph or index < m - 1
        rows.append(
            torch.autograd.grad(losses[index], inputs, retain_graph=keep, allow_unused=True)
        )
    return [
        torch.stack([g if (g := row[k]) is not None else torch.zeros_like(x) for row in rows])
        for k, x in enumerate(inputs)
    ]


def _jacobian_by_vmap(losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool) -> list[Tensor]:
    m = losses.shape[0]
    identity = torch.eye(m, dtype=losses.dtype, device=losses.device)
    grads = torch.autograd.grad(
        losses,
        inputs,
        grad_outputs=identity,
        retain_graph=retain_graph,
        is_grads_batched=True,
        allow_unused=True,
    )
    # Unused inputs come back as None (``materialize_grads`` would drop the batch dimension).
    return [
        torch.zeros((m, *x.shape), dtype=x.dtype, device=x.device) if g is None else g
        for g, x in zip(grads, inputs)
    ]


def compute_jacobian(
    losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool = False, use_vmap: bool = True
) -> list[Tensor]:
    """Return, for each tensor ``x`` of ``inputs``, the Jacobian block ``∂losses/∂x`` of shape
    ``[m, *x.shape]`` (zeros where a loss does not reach ``x``).

    Args:
        losses: a 1-D tensor of ``m`` losses.
        inputs: the tensors to differentiate with respect to.
        retain_graph: keep the graph for a later backward pass.
        use_vmap: try the batched backward first (falls back to a loop if vmap cannot run).
    """
    return JacobianComputer(use_vmap).compute(losses, inputs, retain_graph)


class JacobianComputer:
    """Computes Jacobians, remembering whether vmap works on this model.

    The first batched attempt keeps the graph (so that the loop can still run if vmap fails on
    an operation without a batching rule); once vmap has worked, later calls free the graph as
    they go, which lowers peak memory.
    """

    def __init__(self, use_vmap: bool = True) -> None:
        self.vmap_state = VmapState(None if use_vmap else False)

    @property
    def vmap_works(self) -> bool | None:
        """Whether the batched backward works on this model (``None``: not tried yet)."""
        return self.vmap_state.works

    def compute(
        self, losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool = False
    ) -> list[Tensor]:
        try:
            return self._compute(losses, inputs, retain_graph)
        except RuntimeError as error:
            if "donated buffers" not in str(error):
                raise
            raise RuntimeError(
                "The losses come from a torch.compile'd graph whose backward donated its saved "
                "buffers, so it cannot be differentiated more than once, which the Jacobian "
                "needs. Set `torch._functorch.config.donated_buffer = False` before compiling "
                "(see the README's torch.compile recipe)."
            ) from error

    def _compute(
        self, losses: Tensor, inputs: Sequence[Tensor], retain_graph: bool
    ) -> list[Tensor]:
        if losses.shape[0] == 1:
            grads = torch.autograd.grad(
                losses[0], inputs, retain_graph=retain_graph, materialize_grads=True
            )
            return [g.unsqueeze(0) for g in grads]
        return vmap_or_loop(
            lambda probing: _jacobian_by_vmap(losses, inputs, retain_graph or probing),
            lambda: _jacobian_by_loop(losses, inputs, retain_graph),
            self.vmap_state,
        )
