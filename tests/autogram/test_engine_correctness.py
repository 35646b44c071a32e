"""The engine on the cases that used to crash or go silently wrong (issue 15), each against the
explicit Jacobian of the same losses (see :mod:`._same_losses`)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from ._same_losses import check_gramian, check_step


class _PermutedEmbedding(nn.Module):
    """An embedding output permuted as T5 does (``.permute(2, 0, 1)``): non-contiguous gradients
    reach the embedding and the Linear that reads the permuted tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).permute(2, 0, 1).tanh())  # [d, b, s] -> [d, b, 2]


class _StackedHeads(nn.Module):
    """Two heads stacked along dimension 1, then transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.a(x), self.b(x)], dim=1).transpose(1, 2)  # [b, 3, 2]


def _permuted() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return _PermutedEmbedding(), torch.randint(0, 7, (2, 3))


def _stacked() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return _StackedHeads(), torch.randn(4, 5)


def test_permuted_embedding_output_task_losses() -> None:
    model, tokens = _permuted()
    check_gramian(model, lambda: model(tokens).pow(2).sum((1, 2)), None)  # 4 task losses
    check_step(model, lambda: model(tokens).pow(2).sum((1, 2)), None)


def test_permuted_embedding_output_per_sample() -> None:
    """Samples along dimension 1 of the permuted output: per-sample losses ``[b]``."""
    model, tokens = _permuted()
    check_gramian(model, lambda: model(tokens).pow(2).sum((0, 2)), None)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_stacked_heads(batch_dim: int | None) -> None:
    model, x = _stacked()

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum((0, 1)) if batch_dim is None else out.sum((1, 2))

    check_gramian(model, losses, batch_dim)
    check_step(model, losses, batch_dim)


def test_stacked_heads_task_matrix() -> None:
    """``[batch, tasks]`` losses from the stacked, transposed heads."""
    model, x = _stacked()
    check_gramian(model, lambda: model(x).pow(2).sum(1), 0)
    check_step(model, lambda: model(x).pow(2).sum(1), 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_losses_of_a_float32_model(dtype: torch.dtype) -> None:
    """Issue 19: per-sample losses cast to half precision (``model(x).to(dtype)``) of a float32
    model. The Gramian's entries are float32 sums; rounded to the losses' dtype they moved the
    update by 4-17%. The Gramian is now returned and weighted in the parameters' precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(8, 6)

    def losses() -> Tensor:
        return model(x).pow(2).sum(1).to(dtype)

    gramian = check_gramian(model, losses, 0, rtol=1e-5)
    assert gramian.dtype == torch.float32
    check_step(model, losses, 0, rtol=1e-4)


# -- random draws -----------------------------------------------------------------------------


class _FreeDropout(nn.Module):
    """Direct parameters (so the generic rule re-runs it) and F.dropout(p=0.5) in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5) * 0.5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.dropout(torch.tanh(x @ self.weight), p=0.5, training=self.training)
        return self.head(h)


def _encoder_layer() -> tuple[nn.Module, Tensor]:
    """``nn.TransformerEncoderLayer`` with its default dropout (0.1), in training mode; its
    ``MultiheadAttention`` has direct parameters and draws attention dropout inside."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).double()
    return layer.train(), torch.randn(4, 5, 8, dtype=torch.float64)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_dropout_inside_a_re_run_module(batch_dim: int | None) -> None:
    """The re-run draws the recorded call's dropout mask (38% off before, per-sample)."""
    torch.manual_seed(0)
    model = _FreeDropout().double().train()
    x = torch.randn(5, 6, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum(1) if batch_dim == 0 else out.mean(0)

    check_gramian(model, losses, batch_dim, rtol=1e-10)
    check_step(model, losses, batch_dim, rtol=1e-8)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_transformer_encoder_layer_with_default_dropout(batch_dim: int | None) -> None:
    model, x = _encoder_layer()

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum((1, 2)) if batch_dim == 0 else out.mean((0, 1))[:4]

    check_gramian(model, losses, batch_dim, rtol=1e-10)
    check_step(model, losses, batch_dim, rtol=1e-8)


def test_transformer_encoder_layer_with_dropout_task_matrix() -> None:
    model, x = _encoder_layer()
    check_gramian(model, lambda: model(x).pow(2).sum(1)[:, :3], 0, rtol=1e-10)


def test_re_run_leaves_the_random_stream_as_it_was() -> None:
    """The re-run restores the recorded generator state inside ``fork_rng``: after the step,
    the user's next random draw is the one it would have been without the engine's re-run."""
    torch.manual_seed(0)
    model = _FreeDropout().train()
    x = torch.randn(5, 6)
    from jdoptim.autogram import Engine

    with Engine(model, batch_dim=0) as engine:
        losses = model(x).pow(2).sum(1)
        state = torch.get_rng_state()
        engine.compute_gramian(losses)
        assert torch.equal(torch.get_rng_state(), state)
