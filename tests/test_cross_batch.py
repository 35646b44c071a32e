"""``opt.step(losses, extra_batches=[...])`` for MoDo and SDMGrad: the weights are W(J₁J₂ᵀ) of
the explicit Jacobians (TorchJD's weightings as outside oracle), the update is Σ wᵢ ∇ℓᵢ of the
update batch, heads get their own loss's gradient; bad calls change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import MoDo, SDMGrad, UPGrad

torchjd_aggregation = pytest.importorskip("torchjd.aggregation")


class Net(nn.Module):
    def __init__(self, m: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(5, 1) for _ in range(m))

    def losses(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 4, generator=g, dtype=torch.float64)
        y = torch.randn(8, len(self.heads), generator=g, dtype=torch.float64)
        z = self.trunk(x)
        return [(h(z).squeeze(-1) - y[:, t]).pow(2).mean() for t, h in enumerate(self.heads)]


def _grads(losses: list[Tensor], params: list[nn.Parameter]) -> list[list[Tensor]]:
    rows = []
    for loss in losses:
        row = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append([torch.zeros_like(p) if g is None else g for g, p in zip(row, params)])
    return rows


def _flat(rows: list[list[Tensor]]) -> Tensor:
    return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])


@pytest.mark.parametrize("three", [False, True])
@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_weights_and_update_match_the_explicit_computation(method, three):
    torch.manual_seed(0)
    m = 3
    model = Net(m).double()
    trunk = list(model.trunk.parameters())
    batches = [model.losses(seed) for seed in range(3 if three else 2)]
    cross = _flat(_grads(batches[0], trunk)) @ _flat(_grads(batches[1], trunk)).T
    if method == "modo":
        ours, oracle = MoDo(gamma=0.3), torchjd_aggregation.MoDoWeighting(gamma=0.3)
    else:
        ours, oracle = SDMGrad(), torchjd_aggregation.SDMGradWeighting()
    weights = oracle(cross)
    update = batches[2] if three else [(a + b) / 2 for a, b in zip(*batches)]
    all_params = list(model.parameters())
    per_loss = _grads(update, all_params)

    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), ours)
    opt.step(batches[0], extra_batches=batches[1:])
    torch.testing.assert_close(opt.last_record.weights, weights)
    torch.testing.assert_close(opt.last_record.extras["cross"], cross)
    for k, (name, p) in enumerate(model.named_parameters()):
        if name.startswith("heads."):
            expected = per_loss[int(name.split(".")[1])][k]
        else:
            expected = sum(w * row[k] for w, row in zip(weights, per_loss))
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_second_step_continues_the_method_state():
    model = Net(2).double()
    trunk = list(model.trunk.parameters())
    oracle = torchjd_aggregation.MoDoWeighting(gamma=0.5)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), MoDo(gamma=0.5))
    for step in range(2):
        first, second = model.losses(2 * step), model.losses(2 * step + 1)
        cross = _flat(_grads(first, trunk)) @ _flat(_grads(second, trunk)).T
        opt.zero_grad()
        opt.step(first, extra_batches=[second])
        torch.testing.assert_close(opt.last_record.weights, oracle(cross))


def _snapshot(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()] + [
        p.detach().clone() for p in model.parameters()
    ]


@pytest.mark.parametrize(
    "aggregator, extra, match",
    [
        (MoDo(), None, "extra_batches=\\[losses_2\\]"),
        (UPGrad(), "one", "uses one batch"),
        (SDMGrad(), "three", "one or two more batches"),
        (MoDo(), "renamed", "same losses"),
        (MoDo(), "nan", "Non-finite loss value in batch 2"),
    ],
)
def test_bad_calls_change_nothing(aggregator, extra, match):
    model = Net(2).double()
    losses = model.losses(0)
    other = model.losses(1)
    extra_batches = {
        None: None,
        "one": [other],
        "three": [other, other, other],
        "renamed": [{"a": other[0], "b": other[1]}],
        "nan": [[other[0] * float("nan"), other[1]]],
    }[extra]
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator)
    before = _snapshot(model)
    state = aggregator.state_dict()
    with pytest.raises((ValueError, FloatingPointError), match=match):
        opt.step(losses, extra_batches=extra_batches)
    after = _snapshot(model)
    assert all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before, after)
    )
    assert str(aggregator.state_dict()) == str(state)


def test_standalone_modo_aggregator_on_one_jacobian_needs_the_cross_matrix():
    with pytest.raises(ValueError, match="needs cross"):
        MoDo()(torch.randn(2, 3))


def test_grad_scaler_with_extra_batches_is_refused():
    model = Net(2).double()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MoDo())
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(ValueError, match="grad_scaler"):
        opt.step(model.losses(0), extra_batches=[model.losses(1)], grad_scaler=scaler)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_non_finite_cross_product_is_refused_or_skipped(nonfinite):
    """Finite losses whose Jacobian is not (sqrt at 0): J₁J₂ᵀ is NaN, handled like a NaN
    Gramian; the method's state and the parameters are untouched."""
    model = Net(2).double()
    aggregator = SDMGrad()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator, nonfinite=nonfinite)
    weight = model.trunk[0].weight
    second = [loss + torch.sqrt(0.0 * weight.sum()) for loss in model.losses(1)]
    before = _snapshot(model)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="J₁J₂ᵀ"):
            opt.step(model.losses(0), extra_batches=[second, model.losses(2)])
    else:
        record = opt.step(model.losses(0), extra_batches=[second, model.losses(2)])
        assert record.skipped and "J₁J₂ᵀ" in record.reason
    n = len(list(model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[n:], _snapshot(model)[n:]))
    assert all(p.grad is None for p in model.parameters())
    assert aggregator.weighting._weights is None


def test_an_extra_batch_already_stepped_is_refused_with_nothing_changed():
    from jdoptim.losses import StaleGraphError

    model = Net(2).double()
    aggregator = SDMGrad()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator)
    used = model.losses(1)
    opt.step(model.losses(0), extra_batches=[used])
    before, state = _snapshot(model), str(aggregator.state_dict())
    with pytest.raises(StaleGraphError, match="already used by a step"):
        opt.step(model.losses(2), extra_batches=[model.losses(3), used])
    assert all(torch.equal(a, b) for a, b in zip(before, _snapshot(model)))
    assert str(aggregator.state_dict()) == state


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_non_finite_first_batch_is_refused_or_skipped(nonfinite):
    model = Net(2).double()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MoDo(), nonfinite=nonfinite)
    first = model.losses(0)
    first = [first[0] * float("nan"), first[1]]
    before = _snapshot(model)
    extra = [model.losses(1), model.losses(2)]  # the update batch is finite
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match=r"loss\[0\] \(batch 1\)"):
            opt.step(first, extra_batches=extra)
    else:
        assert opt.step(first, extra_batches=extra).skipped
    assert all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before, _snapshot(model))
    )
