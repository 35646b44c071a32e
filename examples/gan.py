"""GAN-style partial updates: each optimizer owns one network; the other one is left alone.

The generator's step has two losses: fool the discriminator, and keep the samples' mean close to
the data's (a moment-matching term). Both reach the generator (shared: aggregated by JD) and the
first also reaches the discriminator, whose parameters the generator's optimizer does not own
(*foreign*): JDOptimizer never touches them, not even their ``.grad``. The discriminator's own
step is a plain step.

Run: ``python examples/gan.py``
"""

from __future__ import annotations

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


def main(steps: int = 30) -> None:
    torch.manual_seed(0)
    data = torch.randn(512, 2) * 0.5 + torch.tensor([2.0, -1.0])
    generator = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    discriminator = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 1))
    bce = nn.BCEWithLogitsLoss()

    g_opt = JDOptimizer(torch.optim.Adam(generator.parameters(), lr=1e-3), UPGrad())
    d_opt = torch.optim.Adam(discriminator.parameters(), lr=1e-3)

    for _ in range(steps):
        real = data[torch.randint(0, len(data), (64,))]
        fake = generator(torch.randn(64, 4))

        # Discriminator: a plain step on detached fakes.
        d_opt.zero_grad()
        d_loss = bce(discriminator(real), torch.ones(64, 1)) + bce(
            discriminator(fake.detach()), torch.zeros(64, 1)
        )
        d_loss.backward()
        d_opt.step()

        # Generator: a JD step on two losses; the discriminator is foreign to it.
        d_opt.zero_grad()
        g_opt.zero_grad()
        losses = {
            "adversarial": bce(discriminator(fake), torch.ones(64, 1)),
            "moments": (fake.mean(0) - real.mean(0)).pow(2).sum(),
        }
        record = g_opt.step(losses)
        assert all(p.grad is None for p in discriminator.parameters())  # untouched
    print(f"foreign parameters left alone: {len(record.foreign)}; weights {record.weights_by_name}")


if __name__ == "__main__":
    main()
