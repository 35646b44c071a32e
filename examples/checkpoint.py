"""Checkpointing a JD run, stateful aggregator included, and resuming it exactly.

``opt.state_dict()`` is the wrapped optimizer's state dict plus a ``"jdoptim"`` entry holding the
aggregator's state (GradVac's moving averages, Nash-MTL's cached weights, random generators), so
``torch.save`` / ``torch.load`` + ``load_state_dict`` resume the same trajectory.

Run: ``python examples/checkpoint.py``
"""

from __future__ import annotations

import io

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import GradVac


def train(model: nn.Module, opt: JDOptimizer, batches: list) -> None:
    for x, y in batches:
        out = model(x)
        opt.zero_grad()
        opt.step([(out[:, 0] - y).pow(2).mean(), (out[:, 1] + y).pow(2).mean()])


def main() -> None:
    torch.manual_seed(0)
    batches = [(torch.randn(32, 4), torch.randn(32)) for _ in range(6)]
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), GradVac(seed=0))
    train(model, opt, batches[:3])

    file = io.BytesIO()  # or a path: torch.save(..., "checkpoint.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, file)
    train(model, opt, batches[3:])

    file.seek(0)
    checkpoint = torch.load(file)
    resumed = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    resumed.load_state_dict(checkpoint["model"])
    resumed_opt = JDOptimizer(torch.optim.Adam(resumed.parameters(), lr=1e-2), GradVac(seed=0))
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    train(resumed, resumed_opt, batches[3:])

    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))
    print("resumed run identical to the uninterrupted one:", same)
    assert same


if __name__ == "__main__":
    main()
