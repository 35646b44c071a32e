"""A layer's output modified in place afterwards stays on the fast path, exact.

A Linear on a 3-D input returns ``addmm``'s ``[b·s, o]`` result viewed as ``[b, s, o]``; an
in-place operation on that view (``nn.ReLU(inplace=True)``, ``out += residual``) makes autograd
replace the view's node, where the engine's hook recorded the call, by a copy into the base.
The graph walk used to lose the call there (its parameters took one backward row per loss, with
an ``EngineRouteWarning`` that blamed a parameter "used outside the hooked modules' calls");
it now takes the call at the base's node. Checked against the explicit Jacobian of the same
losses (float64), per-sample, ``[batch, tasks]`` and task losses, the default and the
low-memory step, with no ``EngineRouteWarning`` (an error in this suite), also when the output
was used before the in-place operation (both nodes in the graph: the call is counted once).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine

from ._same_losses import check_gramian, check_step


class _InPlace(nn.Module):
    """``head(tanh(relu_(proj(x))))`` on ``[b, s, d]`` tokens, the in-place operation chosen by
    ``mode``: ``"relu"`` (``nn.ReLU(inplace=True)``), ``"residual"`` (``h += x``), ``"used"``
    (the output also used before ``relu_``, per sample)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.proj, self.relu = nn.Linear(5, 5), nn.ReLU(inplace=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.proj(x)
        before = h.sum((1, 2), keepdim=True) if self.mode == "used" else None
        if self.mode == "residual":
            h += x
        else:
            h = self.relu(h)
        out = self.head(torch.tanh(h))
        return out if before is None else out * before.tanh()


def _losses_of(model: nn.Module, layout: str):
    x = torch.randn(3, 4, 5, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x).pow(2)  # [b, s, 3]
        matrix = torch.stack([out.sum((1, 2)), out[:, 0].sum(-1)], dim=1)  # [b, 2]
        if layout == "per-sample":
            return matrix[:, 0]
        return matrix if layout == "batch-tasks" else matrix.mean(0)

    return losses


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks", "tasks"])
@pytest.mark.parametrize("mode", ["relu", "residual", "used"])
def test_in_place_on_a_view_output_is_exact(mode: str, layout: str, low_memory: bool) -> None:
    torch.manual_seed(0)
    model = _InPlace(mode).double()
    batch_dim = None if layout == "tasks" else 0
    losses = _losses_of(model, layout)
    for _ in range(2):  # (the checked first step of the structure, then its remembered route)
        check_gramian(model, losses, batch_dim, rtol=1e-12, low_memory=low_memory)
        check_step(model, losses, batch_dim, rtol=1e-10, low_memory=low_memory)


def test_the_call_is_found_by_the_walk() -> None:
    """The walk takes the call at its output's base: one per-sample backward (``b`` = 3), every
    parameter covered by a Linear rule, none taken from autograd."""
    torch.manual_seed(0)
    model = _InPlace("relu").double()
    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            step = engine.step(_losses_of(model, "per-sample")(), params, [], per_sample=True)
            assert step.b == 3 and step.explicit == []
            assert {type(parts.rule).__name__ for parts in step.rule_parameters} == {"LinearRule"}


class _SequenceFirst(nn.Module):
    """A sequence-first model (``batch_dim=1``): a Linear on ``[s, b, d]`` whose output, a view
    of ``addmm``'s ``[s·b, o]`` rows (not sample-major), is divided in place, as Longformer's
    global query projection is."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:  # x: [s, b, 4]
        h = self.q(x)
        h /= 2.0
        out = (torch.tanh(h) * self.k(x)).pow(2)  # [s, b, 4]
        return torch.stack([out.sum((0, 2)), out[0].sum(-1)])  # [2, b]


def _sequence_first_losses(model: nn.Module, layout: str):
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    return lambda: model(x)[0] if layout == "per-sample" else model(x)


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
def test_in_place_on_a_sequence_first_output_is_exact(layout: str, low_memory: bool) -> None:
    torch.manual_seed(0)
    model = _SequenceFirst().double()
    losses = _sequence_first_losses(model, layout)
    for _ in range(2):
        check_gramian(model, losses, 1, rtol=1e-12, low_memory=low_memory)
        check_step(model, losses, 1, rtol=1e-10, low_memory=low_memory)


@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
def test_a_sequence_first_output_taken_at_its_base_stays_per_sample(layout: str) -> None:
    """The call taken at its output's base keeps its output's shape there (the base's gradient
    read in it), so its samples are along dimension 1, not folded into the base's rows: one
    per-sample backward, no warning (an error in this suite)."""
    torch.manual_seed(0)
    model = _SequenceFirst().double()
    losses = _sequence_first_losses(model, layout)
    params = list(model.parameters())
    with Engine(model, batch_dim=1) as engine:
        for _ in range(2):
            step = engine.step(losses(), params, [], per_sample=True)
            assert step.b == 5 and step.explicit == []
