"""TorchJD 0.18 as an outside oracle: same inputs, same outputs and gradients, same state
trajectories (DWA's epochs, FAMO's logit updates). TorchJD is a test-only dependency."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import jdoptim.scalarization as ours

theirs = pytest.importorskip("torchjd.scalarization")

D = torch.float64


def positive(m: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, generator=g, dtype=D) * 3.0 + 0.1


def preference(m: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.rand(m, generator=g, dtype=D) + 0.05


def pairs(m: int, seed: int) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    w, ref = preference(m, seed), positive(m, seed + 7) * 0.05
    return [
        (ours.Sum(), theirs.Sum()),
        (ours.Mean(), theirs.Mean()),
        (ours.Constant(w), theirs.Constant(w)),
        (ours.GeometricMean(), theirs.GeometricMean()),
        (ours.COSMOS(0.7, w), theirs.COSMOS(0.7, w)),
        (ours.PBI(5.0, w), theirs.PBI(5.0, w)),
        (ours.PBI(2.0, w, ref), theirs.PBI(2.0, w, ref)),
        (ours.STCH(0.1), theirs.STCH(0.1)),
        (ours.STCH(0.5, w, ref), theirs.STCH(0.5, w, ref)),
        (ours.FAMO(m).double(), theirs.FAMO(m).double()),
        (ours.DWA(), theirs.DWA()),
    ]


def value_and_grad(scalarizer: torch.nn.Module, values: Tensor) -> tuple[Tensor, Tensor]:
    leaf = values.clone().requires_grad_()
    out = scalarizer(leaf)
    return out.detach(), torch.autograd.grad(out, leaf)[0]


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stateless_calls_match_torchjd(m: int, seed: int) -> None:
    values = positive(m, seed)
    for mine, reference in pairs(m, seed):
        out, grad = value_and_grad(mine, values)
        expected_out, expected_grad = value_and_grad(reference, values)
        torch.testing.assert_close(out, expected_out, msg=lambda s, n=mine: f"{n}: {s}")
        torch.testing.assert_close(grad, expected_grad, msg=lambda s, n=mine: f"{n}: {s}")


@pytest.mark.parametrize(
    ("ours_cls", "theirs_cls", "attr", "their_attr"),
    [
        (ours.UW, theirs.UW, "log_var", "log_var"),
        (ours.IMTLL, theirs.IMTLL, "log_scale", "log_scale"),
    ],
)
def test_learnable_scalarizers_match_torchjd(ours_cls, theirs_cls, attr, their_attr) -> None:
    mine, reference = ours_cls(4).double(), theirs_cls(4).double()
    start = torch.tensor([0.3, -0.2, 1.1, 0.0], dtype=D)
    with torch.no_grad():
        getattr(mine, attr).copy_(start)
        getattr(reference, their_attr).copy_(start)
    values = positive(4, 3)
    out, grad = value_and_grad(mine, values)
    expected_out, expected_grad = value_and_grad(reference, values)
    torch.testing.assert_close(out, expected_out)
    torch.testing.assert_close(grad, expected_grad)
    param_grad = torch.autograd.grad(mine(values), getattr(mine, attr))[0]
    expected = torch.autograd.grad(reference(values), getattr(reference, their_attr))[0]
    torch.testing.assert_close(param_grad, expected)


def test_random_matches_torchjd_with_the_same_seed() -> None:
    values = positive(5, 0)
    torch.manual_seed(123)
    expected = [value_and_grad(theirs.Random(), values) for _ in range(1)]
    mine = ours.Random(seed=123)
    torch.testing.assert_close(value_and_grad(mine, values), expected[0])


def test_dwa_epochs_match_torchjd() -> None:
    mine, reference = ours.DWA(temperature=1.5), theirs.DWA(temperature=1.5)
    for epoch in range(5):
        for batch in range(3):
            values = positive(3, 10 * epoch + batch)
            torch.testing.assert_close(
                value_and_grad(mine, values), value_and_grad(reference, values)
            )
        mine.step()
        reference.step()


def test_famo_trajectory_matches_torchjd() -> None:
    mine, reference = ours.FAMO(3).double(), theirs.FAMO(3).double()
    for step in range(6):
        values = positive(3, step)
        torch.testing.assert_close(value_and_grad(mine, values), value_and_grad(reference, values))
        after = values * positive(3, 100 + step) / 3.0
        mine.update(after)
        reference.update(after)
        torch.testing.assert_close(mine.logits.detach(), reference._w.detach())


def test_famo_with_lower_bounds_matches_torchjd() -> None:
    bounds = torch.tensor([-1.0, 0.0, 0.05], dtype=D)
    mine = ours.FAMO(3, min_losses=bounds, lr=0.1, weight_decay=0.0).double()
    reference = theirs.FAMO(3, min_losses=bounds, lr=0.1, weight_decay=0.0).double()
    for step in range(3):
        values = positive(3, step)
        torch.testing.assert_close(value_and_grad(mine, values), value_and_grad(reference, values))
        mine.update(values * 0.9)
        reference.update(values * 0.9)
    torch.testing.assert_close(mine.logits.detach(), reference._w.detach())
