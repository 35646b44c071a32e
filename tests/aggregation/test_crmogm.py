"""CRMOGMWeighting: the EMA recursion by hand, its limits, checkpointing, TorchJD as oracle."""

from __future__ import annotations

import pytest
import torch

from jdoptim import JDOptimizer
from jdoptim.aggregation import (
    CRMOGMWeighting,
    GramianWeightedAggregator,
    IMTLGWeighting,
    MoDoWeighting,
    UPGradWeighting,
)


def _gramians(count: int, m: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        J = torch.randn(m, 5, generator=g, dtype=torch.float64)
        out.append(J @ J.T)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.9, 1.0])
def test_recursion_by_hand(alpha):
    gramians = _gramians(4)
    raw = [IMTLGWeighting()(G) for G in gramians]  # the wrapped method, stateless
    smoothed = CRMOGMWeighting(IMTLGWeighting(), alpha=alpha)
    previous = raw[0]
    for G, current in zip(gramians, raw):
        previous = alpha * previous + (1 - alpha) * current
        torch.testing.assert_close(smoothed(G), previous)


def test_initial_weights_and_frozen_limit():
    initial = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    smoothed = CRMOGMWeighting(IMTLGWeighting(), alpha=1.0, initial_weights=initial)
    for G in _gramians(3):
        torch.testing.assert_close(smoothed(G), initial)
    smoothed = CRMOGMWeighting(IMTLGWeighting(), alpha=0.5, initial_weights=initial)
    G = _gramians(1)[0]
    torch.testing.assert_close(smoothed(G), 0.5 * initial + 0.5 * IMTLGWeighting()(G))


def test_matches_torchjd_on_a_stateful_cross_batch_method():
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    ours = CRMOGMWeighting(MoDoWeighting(gamma=0.5), alpha=0.6)
    theirs = torchjd_aggregation.CRMOGMWeighting(torchjd_aggregation.MoDoWeighting(0.5), 0.6)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        A = torch.randn(3, 4, generator=g, dtype=torch.float64) @ torch.randn(
            4, 3, generator=g, dtype=torch.float64
        )
        torch.testing.assert_close(ours(A), theirs(A))


def test_state_dict_resumes_and_reset_restarts_the_wrapped_method():
    A_list = [G - 0.3 * torch.triu(G) for G in _gramians(5)]  # MoDo takes any square A
    straight = CRMOGMWeighting(MoDoWeighting(), alpha=0.7)
    expected = [straight(A) for A in A_list]
    first = CRMOGMWeighting(MoDoWeighting(), alpha=0.7)
    for A in A_list[:2]:
        first(A)
    resumed = CRMOGMWeighting(MoDoWeighting(), alpha=0.7)
    resumed.load_state_dict(first.state_dict())
    for A, want in zip(A_list[2:], expected[2:]):
        torch.testing.assert_close(resumed(A), want)
    resumed.reset()
    torch.testing.assert_close(resumed(A_list[0]), expected[0])


def test_errors():
    with pytest.raises(ValueError, match="alpha"):
        CRMOGMWeighting(UPGradWeighting(), alpha=1.5)
    with pytest.raises(TypeError, match="wraps a Weighting"):
        CRMOGMWeighting(lambda g: g)  # type: ignore[arg-type]
    smoothed = CRMOGMWeighting(IMTLGWeighting(), initial_weights=torch.ones(2))
    with pytest.raises(ValueError, match="initial_weights"):
        smoothed(torch.eye(3))
    smoothed = CRMOGMWeighting(IMTLGWeighting())
    smoothed(torch.eye(3))
    with pytest.raises(ValueError, match="reset"):
        smoothed(torch.eye(2))


def test_in_jdoptimizer_the_record_weights_are_the_smoothed_ones():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    aggregator = GramianWeightedAggregator(CRMOGMWeighting(IMTLGWeighting(), alpha=0.5))
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), aggregator, scope="all")
    raw = []
    for _ in range(2):
        losses = list(model(x).pow(2).mean(dim=0))
        params = list(model.parameters())
        rows = [
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses
        ]
        J = torch.stack(rows)
        raw.append(IMTLGWeighting()(J @ J.T))
        opt.step(losses)
    torch.testing.assert_close(opt.last_record.weights, 0.5 * raw[0] + 0.5 * raw[1])
