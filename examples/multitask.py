"""Multi-task learning: a shared trunk, one head per task, one JD step per batch.

The losses are given as a dict, so the step record names them. The trunk's parameters are reached
by every task: they get the aggregated (non-conflicting) update. Each head is reached by its own
task only: it gets that task's own gradient, as with a summed loss.

Run: ``python examples/multitask.py``
"""

from __future__ import annotations

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.monitoring import History


class MultiTaskNet(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 16), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(16, 1) for _ in range(tasks))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = self.trunk(x)
        return [head(features).squeeze(1) for head in self.heads]


def main(steps: int = 50) -> History:
    torch.manual_seed(0)
    x = torch.randn(256, 10)
    targets = {"price": x[:, 0] * 3, "demand": -x[:, 0] + x[:, 1], "risk": x[:, 2:5].sum(1) * 0.1}

    model = MultiTaskNet(len(targets))
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), aggregator=UPGrad())
    history = History()
    for _ in range(steps):
        outputs = model(x)
        losses = {name: (out - y).pow(2).mean() for (name, y), out in zip(targets.items(), outputs)}
        opt.zero_grad()
        record = opt.step(losses)
        history.append(record)

    print("final losses:", {k: round(v, 4) for k, v in zip(history.names, history.losses[-1])})
    print("weights of the last step:", record.weights_by_name)
    print("conflicting pairs over the run:", sum(n or 0 for n in history.conflicting_pairs))
    return history


if __name__ == "__main__":
    main()
