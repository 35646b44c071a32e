"""Benchmark models: the shared-trunk multi-task MLP of the issues (trunk 256→512→512→256)."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn


class TrunkWithHeads(nn.Module):
    def __init__(self, n_tasks: int, widths: tuple[int, ...] = (256, 512, 512, 256)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for d_in, d_out in pairwise(widths):
            layers += [nn.Linear(d_in, d_out), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(widths[-1], 1) for _ in range(n_tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def task_losses(model: TrunkWithHeads, x: Tensor, y: Tensor) -> list[Tensor]:
    return [(out - y[:, t]).pow(2).mean() for t, out in enumerate(model(x))]


def make_batch(n_tasks: int, batch: int = 128, d_in: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, d_in, generator=g), torch.randn(batch, n_tasks, generator=g)
