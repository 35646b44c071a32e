"""Monitoring a JD run: conflicts, weights, update norm and directional derivatives, then a plot.

Every quantity comes from the Gramian the step already computed (no extra backward pass), and
only when asked for. ``History`` keeps them as plain floats; ``plot_history`` draws them.

Run: ``python examples/monitoring.py [out.png]`` (the plot needs matplotlib).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.monitoring import History, plot_history


def main(path: str | None = None, steps: int = 40) -> History:
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 2))
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), UPGrad(), scope="all")
    history = History()
    for _ in range(steps):
        out = model(x)
        losses = {
            "fit": (out[:, 0] - x[:, 0]).pow(2).mean(),
            "anti": (out[:, 0] + x[:, 1]).pow(2).mean(),
        }
        opt.zero_grad()
        record = opt.step(losses)
        history.append(record)

    print("cosine similarities of the last step:\n", record.cosine_similarities)
    print(
        "conflicting pairs:", record.conflicting_pairs, "| update norm:", float(record.update_norm)
    )
    print("directional derivatives G w (>= 0: no conflict):", record.directional_derivatives)
    if path is not None:
        plot_history(history, path)
        print("wrote", path)
    return history


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
