"""Per-sample losses: one loss per sample of the batch, aggregated by Jacobian descent.

Give ``step`` a 1-D tensor of losses (no ``.mean()``). With ``modules=model, batch_dim=0`` the
Gramian engine computes ``G = J Jᵀ`` (batch × batch) from hooks on the model's layers without
ever holding the Jacobian; without it, the Jacobian path computes ``J`` with one batched
backward. With UPGrad the update conflicts with no sample's gradient.

Run: ``python examples/per_sample.py``
"""

from __future__ import annotations

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


def main(steps: int = 20, batch_size: int = 16) -> float:
    torch.manual_seed(0)
    x = torch.randn(512, 5)
    y = torch.sin(x.sum(1))
    model = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Linear(32, 1))
    sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    # batch_dim=0: loss i depends on sample i (dimension 0) only; the engine uses it.
    opt = JDOptimizer(sgd, UPGrad(), modules=model, batch_dim=0)

    for _ in range(steps):
        index = torch.randint(0, len(x), (batch_size,))
        per_sample = (model(x[index]).squeeze(1) - y[index]).pow(2)  # shape [batch_size]
        opt.zero_grad()
        record = opt.step(per_sample)
    assert record.gramian.shape == (batch_size, batch_size)
    with torch.no_grad():
        loss = (model(x).squeeze(1) - y).pow(2).mean().item()
    print(
        f"after {steps} steps: mean loss {loss:.4f}, last step's conflicting sample pairs: "
        f"{record.conflicting_pairs}"
    )
    return loss


if __name__ == "__main__":
    main()
