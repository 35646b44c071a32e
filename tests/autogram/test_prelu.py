"""``nn.PReLU``'s rule against the explicit Jacobian of the same losses (float64).

One slope or one per channel, on ``[b, C]``, ``[b, C, L]`` and ``[b, C, H, W]`` inputs, per-sample,
``[batch, tasks]`` and task losses, the default and the low-memory step, two steps each; the
rule takes the calls, with no ``EngineRouteWarning`` (an error in this suite: without the rule,
the generic rule's per-sample re-run read the channels of a rank-1-lower input elsewhere, and
the engine re-ran PReLU on the whole batch, warned).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from jdoptim.autogram.rules.prelu import PReLURule

from ._same_losses import check_gramian, check_step


class _Net(nn.Module):
    """``head(flatten(prelu(layer(x))))`` with a Linear or a convolution before the PReLU."""

    def __init__(self, shape: tuple[int, ...], slopes: int) -> None:
        super().__init__()
        self.shape = shape
        layers = {
            2: nn.Linear(4, 4),
            3: nn.Conv1d(4, 4, 3, padding=1),
            4: nn.Conv2d(4, 4, 3, padding=1),
        }
        self.layer = layers[len(shape) + 1]
        self.prelu = nn.PReLU(slopes, init=0.3)
        self.head = nn.Linear(4 * int(torch.tensor(shape[1:]).prod()) if shape[1:] else 4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.prelu(self.layer(x)).flatten(1))


def _losses_of(model: _Net, layout: str):
    x = torch.randn(3, *model.shape, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x).pow(2)  # [b, 2]
        if layout == "per-sample":
            return out[:, 0]
        return out if layout == "batch-tasks" else out.mean(0)

    return losses


SHAPES = [(4,), (4, 5), (4, 3, 5)]


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks", "tasks"])
@pytest.mark.parametrize("slopes", [1, 4], ids=["one-slope", "per-channel"])
@pytest.mark.parametrize("shape", SHAPES, ids=["bC", "bCL", "bCHW"])
def test_prelu_is_exact(shape: tuple, slopes: int, layout: str, low_memory: bool) -> None:
    torch.manual_seed(0)
    model = _Net(shape, slopes).double()
    batch_dim = None if layout == "tasks" else 0
    losses = _losses_of(model, layout)
    for _ in range(2):
        check_gramian(model, losses, batch_dim, rtol=1e-12, low_memory=low_memory)
        check_step(model, losses, batch_dim, rtol=1e-10, low_memory=low_memory)


@pytest.mark.parametrize("slopes", [1, 4], ids=["one-slope", "per-channel"])
def test_the_rule_takes_the_calls(slopes: int) -> None:
    model = _Net((4, 5), slopes).double()
    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        step = engine.step(_losses_of(model, "per-sample")(), params, [], per_sample=True)
        assert step.b == 3
        assert PReLURule in [type(parts.rule) for parts in step.rule_parameters]
