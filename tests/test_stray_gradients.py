"""A backward pass that writes ``.grad`` outside the losses' graph is refused, and changes nothing.

The model here routes its middle layer through a custom ``torch.autograd.Function`` that
recomputes the layer in ``backward`` and calls ``torch.autograd.backward`` on it (what
transformers' Reformer does in its reversible layers): a plain ``loss.backward()`` trains the
layer's parameters through ``.grad``, but the losses' graph never shows them, so a JD step
cannot have their gradients per loss. Before this check the step left in their ``.grad`` the
sum the inner backward accumulated over the step's backward rows, and the wrapped optimizer
applied it (Reformer in the zoo sweep: ``.grad`` 360–430% off). Every JD route refuses such a
step by the parameters' names, with parameters, ``.grad`` and optimizer state bit-identical
(checked with a ``.grad`` that was ``None`` and one that held values, changed in place by the
inner backward), and ``Engine.compute_gramian`` refuses too.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine

from ._snapshots import assert_unchanged, snapshot


class _Recomputed(torch.autograd.Function):
    """``layer(x)`` without a graph; ``backward`` recomputes it and runs its own backward pass,
    which accumulates into the layer's ``.grad``."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: nn.Module) -> Tensor:  # type: ignore[override]
        ctx.layer = layer
        ctx.save_for_backward(x)
        with torch.no_grad():
            return layer(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            torch.autograd.backward(ctx.layer(x), grad)
        return x.grad, None


class _Reversible(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.middle, self.head = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        hidden = _Recomputed.apply(torch.tanh(self.first(x)), self.middle)
        return self.head(torch.tanh(hidden))


def _losses(model: nn.Module, batch_dim: int | None) -> Tensor:
    out = model(torch.randn(3, 4, dtype=torch.float64)).pow(2)
    return out.sum(1) if batch_dim == 0 else out.mean(0)


@pytest.mark.filterwarnings("ignore::jdoptim.autogram.EngineRouteWarning")  # (low memory: no vmap)
@pytest.mark.parametrize("grad_before", ["none", "values"])
@pytest.mark.parametrize("route", ["per-sample", "tasks", "jacobian", "low-memory"])
def test_jd_step_is_refused_and_changes_nothing(route: str, grad_before: str) -> None:
    torch.manual_seed(0)
    model = _Reversible().double()
    batch_dim = 0 if route == "per-sample" else None
    engine = {} if route == "jacobian" else {"modules": model, "batch_dim": batch_dim}
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    _losses(_Plain(model), None).sum().backward()  # a plain step first: Adam's state, .grad
    adam.step()
    opt = JDOptimizer(adam, UPGrad(), **engine, low_memory=route == "low-memory", scope="all")
    if grad_before == "none":
        opt.zero_grad()
    before = snapshot(model, opt)
    # (without modules, the optimizer names them by their place in its groups)
    named = (
        r"param_groups\[0\]\['params'\]\[2\] \(5, 5\)" if route == "jacobian" else "'middle.weight'"
    )
    with pytest.raises(RuntimeError, match=f"{named}.*does not reach"):
        opt.step(_losses(model, batch_dim))
    assert_unchanged(model, opt, before)


class _Plain(nn.Module):
    """The same layers without the custom function (every parameter in the graph)."""

    def __init__(self, model: _Reversible) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        return m.head(torch.tanh(m.middle(torch.tanh(m.first(x)))))


def test_batched_backward_known_to_work_names_the_cause() -> None:
    """Task losses after a step of another structure, which found the batched backward to work:
    the custom function's own backward pass fails inside it (torch: "backward() called inside
    torch.vmap"), and the step says why, changing nothing."""
    torch.manual_seed(0)
    model = _Reversible().double()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), modules=model)
    opt.step(_losses(_Plain(model), None))  # the batched backward works on this engine
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="runs a backward pass of its own"):
        opt.step(_losses(model, None))
    assert_unchanged(model, opt, before)


def test_named_parameters_are_named() -> None:
    """An optimizer given named parameters (torch's ``param_names``) names them so."""
    model = _Reversible().double()
    adam = torch.optim.Adam(model.named_parameters(), lr=0.1)
    if "param_names" not in adam.param_groups[0]:
        pytest.skip("this torch's optimizers take no named parameters")
    opt = JDOptimizer(adam, UPGrad())
    with pytest.raises(RuntimeError, match=r"'middle.weight' \(5, 5\), 'middle.bias'"):
        opt.step(_losses(model, None))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("batch_dim", [0, None])
def test_compute_gramian_is_refused_and_restores_grad(batch_dim: int | None) -> None:
    model = _Reversible().double()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with (
        Engine(model, batch_dim=batch_dim) as engine,
        pytest.raises(RuntimeError, match=r"'middle.weight', 'middle.bias'"),
    ):
        engine.compute_gramian(_losses(model, batch_dim))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())


def test_reformer_is_refused_by_name() -> None:
    """transformers' Reformer (reversible layers, train mode): refused, nothing changed."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ReformerConfig(
        vocab_size=20,
        hidden_size=8,
        num_attention_heads=2,
        attention_head_size=4,
        feed_forward_size=8,
        attn_layers=["local", "local"],
        axial_pos_embds=False,
        max_position_embeddings=8,
        local_attn_chunk_length=4,
        is_decoder=True,
    )
    model = transformers.ReformerModelWithLMHead(config).double().train()
    tokens = torch.randint(0, 20, (3, 8))
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modules=model, batch_dim=0)
    before = snapshot(model, opt)
    logits = model(tokens).logits
    losses = nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    with pytest.raises(RuntimeError, match=r"'reformer\.encoder\.layers\.0\..*does not reach"):
        opt.step(losses.mean(1))
    assert_unchanged(model, opt, before)
