"""Mixed precision with Jacobian descent: autocast, and GradScaler where float16 needs it.

Compute the losses under ``torch.autocast`` and call ``opt.step`` after the block (as you would
call ``backward()``). With float16 (CUDA), pass the ``GradScaler`` to the step and call
``scaler.update()`` after it: the Jacobian is taken of the scaled losses, the aggregator sees the
unscaled Gramian, and the scaler skips the update on overflow. On CPU this runs bfloat16, which
needs no scaler (the scaler is then disabled and changes nothing).

Run: ``python examples/mixed_precision.py``
"""

from __future__ import annotations

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad


def main(steps: int = 10) -> None:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2)).to(device)
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-3), UPGrad())
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    x, y = torch.randn(128, 16, device=device), torch.randn(128, 2, device=device)

    for _ in range(steps):
        with torch.autocast(device, dtype=dtype):
            out = model(x)
            losses = [(out[:, 0] - y[:, 0]).pow(2).mean(), (out[:, 1] - y[:, 1]).abs().mean()]
        opt.zero_grad()
        record = opt.step(losses, grad_scaler=scaler)
        scaler.update()
        if record.skipped:
            print("overflow: step skipped, scale lowered to", scaler.get_scale())
    print(f"{device} {dtype}: losses {record.losses.tolist()}, weights {record.weights.tolist()}")


if __name__ == "__main__":
    main()
