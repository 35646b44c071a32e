"""Shared test models."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MultiTaskMLP(nn.Module):
    """A shared trunk with one linear head per task."""

    def __init__(self, n_tasks: int = 3, d_in: int = 6, hidden: int = 12) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = torch.relu(self.trunk(x))
        return [head(z).squeeze(-1) for head in self.heads]


def task_losses(model: MultiTaskMLP, x: Tensor, targets: Tensor) -> list[Tensor]:
    """Mean-squared error of each head against column ``t`` of ``targets``."""
    return [(out - targets[:, t]).pow(2).mean() for t, out in enumerate(model(x))]


class FreeParam(nn.Module):
    """A module whose free parameter is used before its children (see shared/DESIGN.md)."""

    def __init__(self) -> None:
        super().__init__()
        self.matrix = nn.Parameter(torch.randn(15, 16))
        self.linear1, self.linear2 = nn.Linear(16, 50), nn.Linear(50, 80)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(torch.relu(self.linear1(torch.relu(x @ self.matrix))))


class _NanoAttention(nn.Module):
    """nanoGPT's causal self-attention: one ``[d, 3d]`` projection, SDPA with dropout."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        p = self.dropout if self.training else 0.0
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))


class _NanoBlock(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _NanoAttention(width, heads, dropout)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width), nn.Dropout(dropout)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """A nanoGPT-style language model (Karpathy's ``model.py`` layout, written here): token and
    position embeddings (``wpe(arange(t))``, ``[t, d]``, shared by the samples), pre-norm blocks,
    dropout, and a head tied to the token embedding (with ``read_head``, written as
    ``F.linear(h, wte.weight)`` in the forward, as OLMo writes it, instead of a tied module)."""

    def __init__(
        self,
        vocab: int = 40,
        block: int = 16,
        width: int = 16,
        layers: int = 2,
        heads: int = 2,
        dropout: float = 0.1,
        read_head: bool = False,
    ) -> None:
        super().__init__()
        self.read_head = read_head
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(block, width)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(_NanoBlock(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx: Tensor) -> Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        if self.read_head:
            return nn.functional.linear(self.ln_f(x), self.wte.weight)
        return self.lm_head(self.ln_f(x))


class _BasicBlockGN(nn.Module):
    """ResNet's basic block with GroupNorm; ``depthwise`` makes the first convolution a
    depthwise one followed by a pointwise one (MobileNet style)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int, depthwise: bool) -> None:
        super().__init__()
        if depthwise:
            self.conv1: nn.Module = nn.Sequential(
                nn.Conv2d(c_in, c_in, 3, stride, 1, groups=c_in, bias=False),
                nn.Conv2d(c_in, c_out, 1, bias=False),
            )
        else:
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.gn1(self.conv1(x)))
        return torch.relu(self.gn2(self.conv2(h)) + self.shortcut(x))


class ResNetGN(nn.Module):
    """A ResNet with GroupNorm: a 3×3 stem, stages of basic blocks (the first block of each stage
    after the first downsamples by 2), global average pooling and a linear classifier.
    ``widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2)`` is ResNet-18's layout (CIFAR stem)."""

    def __init__(
        self,
        widths: tuple[int, ...] = (8, 16),
        blocks: tuple[int, ...] = (1, 1),
        classes: int = 3,
        groups: int = 2,
        depthwise: bool = False,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), nn.GroupNorm(groups, widths[0])
        )
        layers: list[nn.Module] = []
        c_in = widths[0]
        for stage, (width, count) in enumerate(zip(widths, blocks)):
            for index in range(count):
                stride = 2 if stage > 0 and index == 0 else 1
                use_dw = depthwise and index == 0
                layers.append(_BasicBlockGN(c_in, width, stride, groups, use_dw))
                c_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.layers(torch.relu(self.stem(x)))
        return self.fc(h.mean(dim=(2, 3)))
