"""Checks of the engine against the explicit Jacobian of *the same* losses.

Each check builds the losses once, takes their explicit Jacobian with one ``autograd.grad`` per
loss on that graph (``retain_graph``), and only then hands the same losses to the code under test.
So a forward that draws random numbers (dropout in training mode) is compared with the Jacobian of
its own draws, never with another forward's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.aggregation.flattening import Flattening, generalize_gramian
from jdoptim.autogram import Engine, EngineRouteWarning

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


#: loss layouts of a model with ``[b, T]`` outputs (:func:`layout_losses`), and their ``batch_dim``
LAYOUT_BATCH_DIM: dict[str, int | None] = {"per-sample": 0, "batch x tasks": 0, "tasks": None}


def layout_losses(model: nn.Module, x: Tensor, layout: str) -> Callable[[], Tensor]:
    """The losses of ``model(x)``'s squared ``[b, T]`` outputs in a layout of
    :data:`LAYOUT_BATCH_DIM`: summed per sample, as they are, or the batch means."""

    def losses() -> Tensor:
        out = model(x).pow(2)
        return {"per-sample": out.sum(1), "batch x tasks": out, "tasks": out.mean(0)}[layout]

    return losses


def check_on_fast_path(
    model: nn.Module,
    losses_of: Callable[[], Tensor],
    batch_dim: int | None,
    low_memory: bool = False,
) -> None:
    """:func:`check_gramian` and :func:`check_step` (relative tolerances ``1e-9`` and ``1e-8``)
    with ``EngineRouteWarning`` as an error: exact on the route the engine certified first."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        check_gramian(model, losses_of, batch_dim, rtol=1e-9, low_memory=low_memory)
        check_step(model, losses_of, batch_dim, rtol=1e-8, low_memory=low_memory)
