"""Mixed precision: GradScaler steps equal the unscaled step computed by hand; autocast works."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, UPGrad, Weighting


class InverseNormWeighting(Weighting):
    """``wᵢ = 1 / (1 + ‖gᵢ‖²)``: not scale-invariant, so scaling must be undone before it."""

    def forward(self, gramian):
        return 1.0 / (1.0 + gramian.diagonal())


class ShrunkSum(Aggregator):
    """``d = Σ gᵢ / (1 + ‖J‖²)``: a non-Gramian aggregator that is not scale-equivariant."""

    def forward(self, matrix):
        return matrix.sum(dim=0) / (1.0 + matrix.pow(2).sum())


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(2))

    def forward(self, x):
        z = self.trunk(x)
        return [head(z).squeeze(1) for head in self.heads]


def _losses(model, x, y, factor=1.0):
    a, b = model(x)
    return [factor * (a - y).pow(2).mean(), factor * (b + y).pow(2).mean()]


def _by_hand(model, x, y, weights_of, lr):
    """Parameters after one SGD step along the JD update computed from explicit gradients."""
    trunk = list(model.trunk.parameters())
    losses = _losses(model, x, y)
    rows, own = [], []
    for i, loss in enumerate(losses):
        grads = torch.autograd.grad(
            loss, trunk + list(model.heads[i].parameters()), retain_graph=True
        )
        rows.append(torch.cat([g.reshape(-1) for g in grads[: len(trunk)]]))
        own.append(grads[len(trunk) :])
    jacobian = torch.stack(rows)
    direction = weights_of(jacobian)
    expected, offset = [], 0
    for p in trunk:
        expected.append(p.detach() - lr * direction[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    for i in range(2):
        for p, g in zip(model.heads[i].parameters(), own[i]):
            expected.append(p.detach() - lr * g)
    return expected, jacobian


def _params(model):
    return list(model.trunk.parameters()) + list(model.heads.parameters())


@pytest.mark.parametrize("kind", ["gramian", "jacobian", "engine"])
def test_grad_scaler_step_equals_the_unscaled_step_by_hand(kind):
    model = TwoHeads()
    x, y = torch.randn(32, 4), torch.randn(32)
    if kind in ("gramian", "engine"):
        aggregator = GramianWeightedAggregator(InverseNormWeighting())

        def weights_of(j):
            return (1.0 / (1.0 + (j @ j.T).diagonal())) @ j
    else:
        aggregator = ShrunkSum()

        def weights_of(j):
            return j.sum(dim=0) / (1.0 + j.pow(2).sum())

    expected, jacobian = _by_hand(model, x, y, weights_of, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    modules = model if kind == "engine" else None  # the Gramian engine (jdoptim.autogram)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator, modules=modules)
    record = opt.step(_losses(model, x, y), grad_scaler=scaler)
    scaler.update()

    assert not record.skipped
    for p, e in zip(_params(model), expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T, rtol=1e-5, atol=1e-6)
    assert scaler.get_scale() == 2.0**12  # no overflow: the scale is kept (growth comes later)


def test_overflow_skips_the_step_exactly_as_grad_scaler_does():
    model = TwoHeads()
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 4), 10 * torch.randn(32)
    before = [p.detach().clone() for p in _params(model)]

    scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=1e-30)
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.1), UPGrad())
    record = opt.step(_losses(model, x, y), grad_scaler=scaler)
    scaler.update()

    twin_scaler = torch.amp.GradScaler("cpu", init_scale=3e38, backoff_factor=1e-30)
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.1)
    twin_scaler.scale(sum(_losses(twin, x, y))).backward()
    twin_scaler.step(twin_opt)
    twin_scaler.update()

    assert record.skipped and "GradScaler" in record.reason
    for p, b in zip(_params(model), before):
        assert torch.equal(p.detach(), b)
    assert len(opt.optimizer.state) == 0 and len(twin_opt.state) == 0  # Adam never stepped
    assert scaler.get_scale() == twin_scaler.get_scale() == pytest.approx(3e38 * 1e-30)

    # The next step, at the lowered scale, goes through.
    opt.zero_grad()
    scaler2_scale = scaler.get_scale()
    assert scaler2_scale < 3e38
    record = opt.step(_losses(model, x, y, factor=1e-3), grad_scaler=scaler)
    scaler.update()
    assert not record.skipped
    assert not torch.equal(_params(model)[0].detach(), before[0])


def test_disabled_scaler_is_the_plain_step():
    model = TwoHeads()
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 4), torch.randn(32)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)).step(
        _losses(model, x, y), grad_scaler=scaler
    )
    JDOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1)).step(_losses(twin, x, y))
    for p, q in zip(_params(model), _params(twin)):
        assert torch.equal(p, q)


def test_grad_scaler_must_be_a_grad_scaler():
    model = TwoHeads()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="GradScaler"):
        opt.step(_losses(model, torch.randn(4, 4), torch.randn(4)), grad_scaler=2.0)


@pytest.mark.parametrize("step_inside_autocast", [False, True])
def test_autocast_bf16_on_cpu(step_inside_autocast):
    model = TwoHeads()
    x, y = torch.randn(32, 4), torch.randn(32)
    trunk = list(model.trunk.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = _losses(model, x, y)
    assert model.trunk(x).dtype == torch.float32  # outside autocast
    # Explicit per-loss gradients of the very same bf16 graph.
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, trunk, retain_graph=True)
        rows.append(torch.cat([g.float().reshape(-1) for g in grads]))
    jacobian = torch.stack(rows)
    before = torch.cat([p.detach().reshape(-1) for p in trunk])

    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), UPGrad())
    if step_inside_autocast:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            record = opt.step(losses)
    else:
        record = opt.step(losses)

    after = torch.cat([p.detach().reshape(-1) for p in trunk])
    assert record.gramian.dtype == torch.float32  # not computed in bf16
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T, rtol=1e-4, atol=1e-6)
    update = before - after
    torch.testing.assert_close(update, record.weights @ jacobian, rtol=1e-4, atol=1e-6)
    assert bool((jacobian @ update >= -1e-6).all())  # UPGrad: no conflict
