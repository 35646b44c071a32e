"""Split parents: a module with direct parameters *and* children with parameters (a ViT with its
own ``cls_token`` and ``pos_embed`` around its blocks, as timm writes it; a block with a
layer-scale ``gamma``) has its children hooked on their own rules, and its direct parameters
read where the batch meets them (sample-shared regions: an expansion, a product, or an
element-wise sum, difference or product with the batched activations). Where no such entry
reads them, the step takes the parent's call whole (the generic rule), as before.

Every case: the Engine's Gramian and the JDOptimizer's ``.grad`` against the explicit Jacobian
of the same losses, three steps of one engine, and which route the step took.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram.rules import GenericRule

from ._oracle import explicit_jacobian
from ._same_losses import LAYOUT_BATCH_DIM, check_on_fast_path, layout_losses, trainable


class _TimmStyleViT(nn.Module):
    """``cls_token`` and ``pos_embed`` on the model, blocks with dropout."""

    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.patch = nn.Linear(12, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16) * 0.5)
        block = nn.TransformerEncoderLayer(16, 2, 24, dropout=dropout, batch_first=True)
        self.blocks = nn.Sequential(block)
        self.head = nn.Linear(16, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, 4, 12] → [b, 2]
        tokens = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), self.patch(x)], dim=1)
        return self.head(self.blocks(tokens + self.pos_embed)[:, 0])


class _Operands(nn.Module):
    """Direct parameters met by the batch in every element-wise way the regions read: a
    product on either side, a difference on either side, a sum with ``alpha``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.delta = nn.Parameter(torch.randn(1, 6))
        self.offset = nn.Parameter(torch.randn(6))
        self.shift = nn.Parameter(torch.randn(6))
        self.bias = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, 6]
        h = self.gamma * torch.tanh(self.inner(x))
        h = torch.tanh(h) * self.delta
        h = torch.tanh(h - self.offset)
        h = torch.tanh(self.shift - h)
        h = torch.add(h, self.bias, alpha=2.0)
        return self.head(h)


class _FoldedRows(nn.Module):
    """Direct parameters met by the samples' rows folded sample-major (``[b, s, d]`` →
    ``[b·s, d]``, as OPT folds them before its MLP): each sample owns ``s`` rows of the sum and
    of the product."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(6, 6)
        self.bias = nn.Parameter(torch.randn(6))
        self.gamma = nn.Parameter(torch.rand(1, 6) + 0.5)
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, 3, 6]
        rows = self.inner(x).reshape(-1, 6)  # [b·3, 6]
        rows = torch.tanh(rows + self.bias) * self.gamma
        return self.head(rows.view(x.shape[0], -1, 6).mean(1))


class _Lookup(nn.Module):
    """A table of the module's own looked up with ``F.embedding``: no region entry reads it, so
    the step takes the module's call whole."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(20, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, items: Tensor) -> Tensor:  # [b, 3] ids
        return self.head(torch.tanh(F.embedding(items, self.table)).mean(1))


_MODELS: dict[str, Callable[[], tuple[nn.Module, Tensor]]] = {
    "timm-style ViT": lambda: (_TimmStyleViT(), torch.randn(5, 4, 12)),
    "element-wise operands": lambda: (_Operands(), torch.randn(5, 6)),
    "folded rows": lambda: (_FoldedRows(), torch.randn(5, 3, 6)),
    "lookup (whole call)": lambda: (_Lookup(), torch.randint(0, 20, (5, 3))),
}


def _whole(model: nn.Module, engine: Engine, losses: Tensor) -> bool:
    """Whether the step took the model's own call (the generic rule re-running it whole)."""
    step = engine.step(losses, trainable(model), [], per_sample=engine.batch_dim is not None)
    return any(
        isinstance(parts.rule, GenericRule) and parts.rule.call.module is model
        for parts in step.rule_parameters
    )


@pytest.mark.parametrize("layout", list(LAYOUT_BATCH_DIM))
@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_split_parents_are_exact_without_route_warnings(
    name: str, low_memory: bool, layout: str
) -> None:
    torch.manual_seed(0)
    model, x = _MODELS[name]()
    model = model.double().train()
    x = x.double() if x.is_floating_point() else x
    losses = layout_losses(model, x, layout)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[layout], low_memory=low_memory)


@pytest.mark.parametrize("name", list(_MODELS))
def test_split_parents_take_their_route_at_every_step(name: str) -> None:
    """Per-sample: the children's rules and the regions, the model never re-run, where entries
    read its direct parameters; else its call whole. Three steps of one engine (the route and
    the template are remembered), each exact."""
    torch.manual_seed(0)
    model, x = _MODELS[name]()
    model = model.double().train()
    x = x.double() if x.is_floating_point() else x
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        with Engine(model, batch_dim=0) as engine:
            for _ in range(3):
                losses = model(x).pow(2).sum(1)
                jacobian = explicit_jacobian(losses, trainable(model))
                gramian = engine.compute_gramian(losses, retain_graph=True)
                torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
                assert _whole(model, engine, losses) == (name == "lookup (whole call)")
