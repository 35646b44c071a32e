"""Checks of the engine against the explicit Jacobian of *the same* losses.

Each check builds the losses once, takes their explicit Jacobian with one ``autograd.grad`` per
loss on that graph (``retain_graph``), and only then hands the same losses to the code under test.
So a forward that draws random numbers (dropout in training mode) is compared with the Jacobian of
its own draws, never with another forward's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.aggregation.flattening import Flattening, generalize_gramian
from jdoptim.autogram import Engine

from ._oracle import as_square, assert_gramian_close, explicit_jacobian


def trainable(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def all_aggregated_optimizer(
    model: nn.Module, batch_dim: int | None, low_memory: bool = False
) -> JDOptimizer:
    """``JDOptimizer`` with UPGrad on the engine, every parameter aggregated (``scope="all"``),
    SGD at ``lr=0`` (steps leave the parameters as they are)."""
    return JDOptimizer(
        torch.optim.SGD(trainable(model), lr=0.0),
        UPGrad(),
        modules=model,
        batch_dim=batch_dim,
        scope="all",
        low_memory=low_memory,
    )


def check_gramian(
    model: nn.Module,
    losses_of: Callable[[], Tensor],
    batch_dim: int | None,
    rtol: float = 1e-5,
    low_memory: bool = False,
) -> Tensor:
    """The Engine's Gramian of ``losses_of()`` equals ``J Jᵀ`` of the same losses; returns it."""
    with Engine(model, batch_dim=batch_dim, low_memory=low_memory) as engine:
        losses = losses_of()
        jacobian = explicit_jacobian(losses, trainable(model)).double().cpu()
        gramian = engine.compute_gramian(losses).cpu()
    shape = tuple(losses.shape)
    actual = gramian.reshape(1, 1) if losses.dim() == 0 else as_square(gramian, shape)
    assert_gramian_close(actual, jacobian @ jacobian.T, rtol=rtol)
    return gramian


def check_step(
    model: nn.Module,
    losses_of: Callable[[], Tensor],
    batch_dim: int | None,
    rtol: float = 1e-4,
    low_memory: bool = False,
) -> None:
    """``JDOptimizer(modules=model)``'s ``.grad`` equals ``Jᵀ w`` of the same losses, with ``w``
    UPGrad's weights on the explicit Gramian (``scope="all"``: every parameter is aggregated)."""
    params = trainable(model)
    model.zero_grad(set_to_none=True)
    opt = all_aggregated_optimizer(model, batch_dim, low_memory)
    try:
        losses = losses_of()
        jacobian = explicit_jacobian(losses, params).double()
        gramian = jacobian @ jacobian.T
        weighting = UPGrad().weighting
        if losses.dim() > 1:
            generalized = generalize_gramian(gramian, tuple(losses.shape))
            weights = Flattening(weighting)(generalized).reshape(-1)
        else:
            weights = weighting(gramian)
        expected = weights @ jacobian
        opt.step(losses)
    finally:
        opt._update_computer.engine.close()  # type: ignore[attr-defined]
    actual = torch.cat([p.grad.reshape(-1) for p in params]).double()
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual - expected).abs().max() / scale
    assert error < rtol, f"relative error of .grad {error:.3g}"
