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
