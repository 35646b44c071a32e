"""torch's per-operator ``vmap`` fallback notice stays inside the library's batched products.

Inside ``vmap``, an operator without a batching rule runs one row at a time and torch warns
("There is a performance drop because we have not yet implemented the batching rule for …"). The
library's batched products meet it on weight norm's backward (wav2vec2-style positional
convolutions) and on the CPU backward of ``scaled_dot_product_attention`` in a re-run: exact
results, and a notice its user cannot act on. These models go through those products in every
layout; each step must be exact against the explicit Jacobian of the same losses and leave no
such warning, while a warning of the model's own still reaches the user.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations

from jdoptim.linalg.vmap_fallback import FALLBACK_NOTICE, fallback_notice_silenced

from ._same_losses import LAYOUT_BATCH_DIM, check_gramian, check_step, layout_losses


class _WeightNormConv(nn.Module):
    """A wav2vec2-style positional convolution (weight norm over the kernel axis) on
    ``[b, c, s]``, then a Linear to two outputs per sample."""

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.conv = parametrizations.weight_norm(conv, name="weight", dim=2)
        self.head = nn.Linear(4 * 5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).flatten(1))


class _OwnAttention(nn.Module):
    """Attention with a direct parameter (a learned query scale, so no layer rule takes it) on
    ``scaled_dot_product_attention``: re-run by the generic rule."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3, 6, 6) / 3)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = (x @ w for w in self.qkv)
        return F.scaled_dot_product_attention(
            (q * self.scale).unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        ).squeeze(1)


class _AttentionModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = _OwnAttention()
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attention(x).mean(1))


def _model_and_input(name: str) -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    if name == "weight-norm conv":
        return _WeightNormConv().double(), torch.randn(3, 4, 5, dtype=torch.float64)
    return _AttentionModel().double(), torch.randn(3, 5, 6, dtype=torch.float64)


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low memory"])
@pytest.mark.parametrize("layout", list(LAYOUT_BATCH_DIM))
@pytest.mark.parametrize("name", ["weight-norm conv", "own attention"])
def test_exact_without_the_fallback_notice(name: str, layout: str, low_memory: bool) -> None:
    model, x = _model_and_input(name)
    losses = layout_losses(model, x, layout)
    batch_dim = LAYOUT_BATCH_DIM[layout]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):  # the checked first step, then the remembered route
            check_gramian(model, losses, batch_dim, rtol=1e-9, low_memory=low_memory)
            check_step(model, losses, batch_dim, rtol=1e-8, low_memory=low_memory)
    notices = [str(w.message) for w in caught if FALLBACK_NOTICE in str(w.message)]
    assert notices == []


def test_the_silencing_keeps_every_other_warning() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with fallback_notice_silenced():
            warnings.warn(f"{FALLBACK_NOTICE} rule for aten::example.", UserWarning, stacklevel=1)
            warnings.warn("the model's own warning", UserWarning, stacklevel=1)
        warnings.warn(f"{FALLBACK_NOTICE} rule for aten::outside.", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "the model's own warning",
        f"{FALLBACK_NOTICE} rule for aten::outside.",
    ]
