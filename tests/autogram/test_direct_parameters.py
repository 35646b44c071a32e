"""Modules with direct parameters *and* children with parameters, as people write them: a model
with a ``pos_embed`` / ``cls_token`` of its own, a block with a layer-scale ``gamma`` (ConvNeXt,
CaiT), a parent that uses its child's weight itself. Such a module is a split parent
(``jdoptim.autogram._selection.is_split_parent``): its children are hooked on their own rules,
and a per-sample step reads its direct parameters where the batch meets them (sample-shared
regions), or takes its call whole (the generic rule re-runs it) where no region entry reads them
and in task mode. Every case is checked against the explicit Jacobian of the same losses (same
forward, same dropout masks), and, where the route is a fast one, without a route warning.

Design note (measured, 2026-12-06): hooking such a module for its direct parameters only, with
its children hooked on their own rules, was built and dropped. The generic rule must still
re-run the whole subtree to differentiate the direct parameters (for a ``pos_embed`` used at the
input, a per-sample backward through the whole model), and the children's rules then come on
top: on a 4-block ConvNeXt-style model the per-sample step went from 2.2x to 3.3x a plain step
(2 tasks: 2.5x to 4.7x), on a model with its own ``pos_embed`` from 48 to 66 ms. The split
parents (2026-12-07) re-run nothing: the direct parameters' rows come from the regions'
backward (a ViT with its own tokens, batch 16: 6.7x to 2.2x a plain step per-sample), and the
whole call remains the route where that cannot be (``tests/autogram/test_split_parents.py``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine

from ._same_losses import (
    LAYOUT_BATCH_DIM,
    check_gramian,
    check_on_fast_path,
    check_step,
    layout_losses,
)


class _TinyViT(nn.Module):
    """A hand-written ViT as people write them: ``cls_token`` and ``pos_embed`` are parameters
    of the model itself, the blocks are ``nn.TransformerEncoderLayer`` with dropout."""

    def __init__(self, dropout: float, tasks: int = 1) -> None:
        super().__init__()
        self.patch = nn.Linear(12, 16)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 16) * 0.5)
        self.pos_embed = nn.Parameter(torch.randn(1, 5, 16) * 0.5)
        self.blocks = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(16, 2, 24, dropout=dropout, batch_first=True)
                for _ in range(2)
            ]
        )
        self.head = nn.Linear(16, tasks)

    def forward(self, x: Tensor) -> Tensor:  # x: [b, 4, 12]
        tokens = self.patch(x)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], dim=1) + self.pos_embed
        return self.head(self.blocks(h)[:, 0])


class _LayerScaleBlock(nn.Module):
    """A ConvNeXt block: depthwise convolution, LayerNorm over channels, an MLP and a layer-scale
    ``gamma`` (a direct parameter) on the residual branch."""

    def __init__(self, channels: int = 6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc1, self.fc2 = nn.Linear(channels, 12), nn.Linear(12, channels)
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dwconv(x).permute(0, 2, 3, 1)
        h = self.fc2(F.gelu(self.fc1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 3, 1, 2)


class _ConvNeXtLike(nn.Module):
    def __init__(self, tasks: int = 1) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 2, stride=2)
        self.blocks = nn.Sequential(_LayerScaleBlock(), _LayerScaleBlock())
        self.head = nn.Linear(6, tasks)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class _UsesChildWeight(nn.Module):
    """A parent that calls its child *and* uses the child's weight itself (as
    ``MultiheadAttention`` uses ``out_proj.weight``): the weight's rows are the sum over the
    child's call (its rule) and the parent's (the generic rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([0.7, -1.2, 0.4]))
        self.proj = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.proj(x) * self.scale) + F.linear(x, self.proj.weight.flip(0))


@pytest.mark.parametrize("setting", list(LAYOUT_BATCH_DIM))
def test_model_with_its_own_position_embedding(setting: str) -> None:
    """Engine Gramian and JDOptimizer .grad against the explicit Jacobian."""
    torch.manual_seed(0)
    model = _TinyViT(0.0, tasks=2).double().train()
    x = torch.randn(6, 4, 12, dtype=torch.float64)
    losses = layout_losses(model, x, setting)
    batch_dim = LAYOUT_BATCH_DIM[setting]
    check_on_fast_path(model, losses, batch_dim)


@pytest.mark.parametrize("setting", list(LAYOUT_BATCH_DIM))
def test_model_with_its_own_position_embedding_and_dropout(setting: str) -> None:
    """The same model with dropout 0.2 in train mode: exact, on the fast path. (The model's
    re-run replays its blocks; ``scaled_dot_product_attention`` with dropout consumes the CPU
    random stream differently under ``torch.func`` than in the recorded forward, so a re-run
    under ``torch.func.vjp`` drew other masks and the engine's check fell back to rows from
    autograd; the generic rule now re-runs a call that drew random numbers eagerly.)"""
    torch.manual_seed(0)
    model = _TinyViT(0.2, tasks=2).double().train()
    x = torch.randn(6, 4, 12, dtype=torch.float64)
    check_on_fast_path(model, layout_losses(model, x, setting), LAYOUT_BATCH_DIM[setting])


class _PermutedDropoutStage(nn.Module):
    """A CvT stage: patch embedding by a convolution, its ``[b, c, h, w]`` output permuted to
    tokens and back (a non-contiguous view) before dropout, and a class token of the stage's own
    (a direct parameter, so the generic rule re-runs the whole stage)."""

    def __init__(self, tasks: int) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(8)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 8))
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, tasks)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        b, c, height, width = h.shape
        tokens = self.norm(h.view(b, c, height * width).permute(0, 2, 1))
        h = F.dropout(tokens.permute(0, 2, 1).view(b, c, height, width), 0.3, self.training)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), h.flatten(2).transpose(1, 2)], 1)
        tokens = F.dropout(torch.tanh(self.mix(tokens)), 0.3, self.training)
        return self.head(tokens[:, 0] + tokens[:, 1:].mean(1))


@pytest.mark.parametrize("setting", list(LAYOUT_BATCH_DIM))
def test_dropout_of_a_permuted_view_in_a_re_run(setting: str) -> None:
    """Under ``torch.func`` transforms, ``dropout`` of a non-contiguous tensor lays the random
    stream out in another order than the eager call (other masks from the same generator state;
    CvT's stages were 2% off and fell back to rows from autograd): the eager re-run draws the
    recorded masks, exact on the fast path."""
    torch.manual_seed(0)
    model = _PermutedDropoutStage(tasks=2).double().train()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    check_on_fast_path(model, layout_losses(model, x, setting), LAYOUT_BATCH_DIM[setting])


@pytest.mark.parametrize("setting", list(LAYOUT_BATCH_DIM))
def test_blocks_with_layer_scale(setting: str) -> None:
    torch.manual_seed(0)
    model = _ConvNeXtLike(tasks=2).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    losses = layout_losses(model, x, setting)
    batch_dim = LAYOUT_BATCH_DIM[setting]
    check_on_fast_path(model, losses, batch_dim)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_parent_using_its_childs_weight(batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = _UsesChildWeight().double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum(1) if batch_dim == 0 else out.mean(0)

    check_on_fast_path(model, losses, batch_dim)


def test_direct_parameter_also_used_outside_the_call() -> None:
    """The layer-scale ``gamma`` of a block also enters the loss directly: it takes its rows
    from autograd (outside any call), still exact."""
    torch.manual_seed(0)
    model = _ConvNeXtLike(tasks=2).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x).pow(2).mean(0)
        return out + model.blocks[0].gamma.pow(2).sum()

    check_gramian(model, losses, None, rtol=1e-9)
    check_step(model, losses, None, rtol=1e-8)


# -- a hooked module called inside another hooked module's call -------------------------------


class _Magnitude(nn.Module):
    """peft's DoRA pattern: a module with a parameter of its own whose forward calls another
    hooked module handed to it as an argument (``inner`` is not its child)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: Tensor, *, inner: nn.Module) -> Tensor:
        return self.weight * torch.tanh(inner(x))


class _CallsInside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.magnitude = _Magnitude()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.magnitude(x, inner=self.inner))


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_hooked_module_called_inside_another_call(batch_dim: int | None) -> None:
    """``inner``'s call happens inside ``magnitude``'s: the engine's scan of the graph (which
    steps over recorded calls) walks into a call inside which other hooked calls were made, and
    finds it there, so ``inner`` keeps its own rule and per-sample steps their one backward pass
    (they took one backward row per loss before, with ``inner``'s parameters straight from
    autograd); ``compute_gramian`` and the optimizer's step both differentiate them (they were
    once dropped from ``compute_gramian`` as unreached: a Gramian 87% off on peft's DoRA)."""
    torch.manual_seed(0)
    model = _CallsInside().double()
    x = torch.randn(5, 3, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x)
        per_sample = out[:, 0].pow(2) + out[:, 1].sin()
        return (
            per_sample
            if batch_dim == 0
            else torch.stack([out[:, 0].pow(2).mean(), out[:, 1].sin().mean()])
        )

    check_gramian(model, losses, batch_dim, rtol=1e-12)
    check_step(model, losses, batch_dim, rtol=1e-12)  # (route warnings are errors here)
    if batch_dim == 0:  # inner's call is found inside magnitude's: the per-sample path
        with Engine(model, batch_dim=0) as engine:
            step = engine.step(losses(), list(model.parameters()), [], per_sample=True)
        assert step.b == 5
        kinds = {type(parts.rule).__name__ for parts in step.rule_parameters}
        assert kinds == {"LinearRule", "GenericRule"}


class _Flaky(nn.Module):
    """A re-run module (a parameter of its own and a child) whose forward can raise midway,
    after its child's call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(4) + 0.5)
        self.inner = nn.Linear(3, 4)
        self.fail = False

    def forward(self, x: Tensor, *, other: nn.Module) -> Tensor:
        h = other(x)
        if self.fail:
            raise RuntimeError("a forward that raises")
        return self.scale * torch.tanh(self.inner(x) + h)


class _WithFlaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.other = nn.Linear(3, 4)
        self.flaky = _Flaky()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.flaky(x, other=self.other))


def test_a_forward_that_raises_leaves_no_open_call() -> None:
    """The hooks note the calls made inside a re-run module's call until its forward hook; a
    forward that raises still runs it (``always_call``), so no call stays open to collect every
    later record, and the next steps are exact."""
    torch.manual_seed(0)
    model = _WithFlaky().double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with Engine(model, batch_dim=0) as engine:
        model.flaky.fail = True
        with pytest.raises(RuntimeError, match="a forward that raises"):
            model(x)
        model.flaky.fail = False
        assert not engine._pending.open and not any(engine._pending.values())
    losses = lambda: model(x).pow(2).sum(1)  # noqa: E731
    check_gramian(model, losses, 0, rtol=1e-12)
    check_step(model, losses, 0, rtol=1e-12)


class _OldStyleScan(torch.autograd.Function):
    """A cumulative decay ``h_t = a ⊙ h_{t−1} + x_t`` over ``[b, s, d]``, written as an
    ``autograd.Function`` without ``setup_context`` (as RecurrentGemma's RG-LRU scan is), which
    ``torch.func`` cannot run."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: Tensor) -> Tensor:
        steps = [x[:, 0]]
        for t in range(1, x.shape[1]):
            steps.append(a * steps[-1] + x[:, t])
        h = torch.stack(steps, 1)
        ctx.save_for_backward(h, a)
        return h

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        h, a = ctx.saved_tensors
        grad_x = torch.empty_like(grad)
        carried = torch.zeros_like(grad[:, 0])
        for t in reversed(range(grad.shape[1])):
            carried = grad[:, t] + a * carried
            grad_x[:, t] = carried
        grad_a = (grad_x[:, 1:] * h[:, :-1]).sum((0, 1))
        return grad_x, grad_a


class _Recurrence(nn.Module):
    """A module with a direct parameter (the decay) and an input projection, whose forward runs
    the scan: no layer rule takes it, and its re-run must be eager."""

    def __init__(self) -> None:
        super().__init__()
        self.decay = nn.Parameter(torch.rand(4) * 0.9)
        self.proj = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return _OldStyleScan.apply(self.proj(x), self.decay)


class _WithRecurrence(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.recurrence = _Recurrence()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.recurrence(self.embed(x))).mean(1))


@pytest.mark.parametrize(
    "setting, low_memory",
    [(setting, False) for setting in LAYOUT_BATCH_DIM] + [("per-sample", True)],
)
def test_module_that_torch_func_cannot_re_run(setting: str, low_memory: bool) -> None:
    """Its rows come from an eager re-run of the whole call, differentiated by autograd: exact,
    on the fast path (not from autograd's rows per loss, with a route warning)."""
    torch.manual_seed(0)
    model = _WithRecurrence().double()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    losses = layout_losses(model, x, setting)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[setting], low_memory=low_memory)
