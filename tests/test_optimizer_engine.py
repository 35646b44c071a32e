"""JDOptimizer(modules=...) gives the same step as the explicit-Jacobian path."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import MGDA, Aggregator, Mean, TrimmedMean, UPGrad
from jdoptim.autogram import GramianUpdate
from tests.models import MultiTaskMLP, task_losses


def _grads(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def _assert_same_grads(a: list[Tensor | None], b: list[Tensor | None]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def _one_step(
    model: nn.Module,
    losses_of: Callable[[nn.Module], object],
    aggregator: Aggregator,
    engine: bool,
    **kwargs,
) -> tuple[list[Tensor | None], object]:
    """One JD step on a copy of ``model`` (plain SGD, lr 0: only ``.grad`` matters)."""
    model = copy.deepcopy(model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    batch_dim = kwargs.pop("batch_dim", None)
    if engine:
        opt = JDOptimizer(sgd, aggregator, modules=model, batch_dim=batch_dim, **kwargs)
    else:
        opt = JDOptimizer(sgd, aggregator, **kwargs)
    record = opt.step(losses_of(model))
    return _grads(model), record


@pytest.mark.parametrize("scope", ["shared", "all"])
@pytest.mark.parametrize("aggregator", [UPGrad(), Mean(), MGDA()], ids=["upgrad", "mean", "mgda"])
def test_task_losses_match_jacobian_path(scope: str, aggregator: Aggregator) -> None:
    model = MultiTaskMLP(n_tasks=3)
    x, y = torch.randn(8, 6), torch.randn(8, 3)

    def losses(m: nn.Module) -> list[Tensor]:
        return task_losses(m, x, y)

    expected, rec_j = _one_step(model, losses, aggregator, False, scope=scope)
    actual, rec_e = _one_step(model, losses, aggregator, True, scope=scope)
    _assert_same_grads(actual, expected)
    torch.testing.assert_close(rec_e.gramian, rec_j.gramian, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(rec_e.weights, rec_j.weights, rtol=1e-4, atol=1e-6)


def test_engine_is_used() -> None:
    model = MultiTaskMLP()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modules=model)
    assert isinstance(opt._update_computer, GramianUpdate)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 5)
        self.conv = nn.Conv1d(5, 6, 2)
        self.norm = nn.LayerNorm(6)
        self.out = nn.Linear(6, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.conv(self.embed(tokens).transpose(1, 2)).transpose(1, 2)
        return self.out(torch.relu(self.norm(h))).mean(1)


def test_per_sample_losses_match_jacobian_path() -> None:
    """batch_dim=0 and a [batch] vector: instance-wise risk minimisation."""
    model = _Net()
    tokens, y = torch.randint(0, 9, (6, 4)), torch.randn(6, 3)

    def losses(m: nn.Module) -> Tensor:
        return (m(tokens) - y).pow(2).sum(1)

    expected, rec_j = _one_step(model, losses, UPGrad(), False)
    actual, rec_e = _one_step(model, losses, UPGrad(), True, batch_dim=0)
    _assert_same_grads(actual, expected)
    torch.testing.assert_close(rec_e.gramian, rec_j.gramian, rtol=1e-4, atol=1e-7)


def test_batch_task_matrix_is_flattened() -> None:
    """A [batch, tasks] matrix with batch_dim=0 gives the step of its flattened vector."""
    model = _Net()
    tokens, y = torch.randint(0, 9, (5, 4)), torch.randn(5, 3)

    def matrix(m: nn.Module) -> Tensor:
        return (m(tokens) - y).pow(2)

    expected, rec_j = _one_step(model, lambda m: matrix(m).reshape(-1), UPGrad(), False)
    actual, rec_e = _one_step(model, matrix, UPGrad(), True, batch_dim=0)
    _assert_same_grads(actual, expected)
    assert rec_e.weights.shape == (15,)
    assert rec_e.names[4] == "loss[1, 1]"
    torch.testing.assert_close(rec_e.weights, rec_j.weights, rtol=1e-4, atol=1e-6)


def test_matrix_refused_without_engine() -> None:
    model = _Net()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="shape"):
        opt.step(model(torch.randint(0, 9, (5, 4))).pow(2))


def test_non_gramian_aggregator_falls_back() -> None:
    model = MultiTaskMLP(n_tasks=4)
    x, y = torch.randn(8, 6), torch.randn(8, 4)

    def losses(m: nn.Module) -> list[Tensor]:
        return task_losses(m, x, y)

    expected, _ = _one_step(model, losses, TrimmedMean(1), False)
    actual, record = _one_step(model, losses, TrimmedMean(1), True)
    _assert_same_grads(actual, expected)
    assert record.weights is None


def test_foreign_parameters_untouched() -> None:
    """A generator step through a discriminator that another optimizer owns."""
    generator, critic = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = JDOptimizer(torch.optim.SGD(generator.parameters(), lr=0.1), modules=[generator, critic])
    before = [p.detach().clone() for p in critic.parameters()]
    out = critic(generator(torch.randn(5, 3)))
    opt.step([out[:, 0].mean(), out[:, 1].mean()])
    assert all(p.grad is None for p in critic.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, critic.parameters()))
    assert all(p.grad is not None for p in generator.parameters())


def test_parameter_outside_modules_is_exact() -> None:
    """A shared parameter of the optimizer that no hooked module holds (a free scale)."""
    model = MultiTaskMLP(n_tasks=2)
    scale = nn.Parameter(torch.tensor(1.5))
    x, y = torch.randn(8, 6), torch.randn(8, 2)

    def run(engine: bool) -> list[Tensor | None]:
        m, s = copy.deepcopy(model), copy.deepcopy(scale)
        params = [*m.parameters(), s]
        sgd = torch.optim.SGD(params, lr=0.0)
        opt = JDOptimizer(sgd, UPGrad(), modules=m) if engine else JDOptimizer(sgd, UPGrad())
        opt.step([loss * s for loss in task_losses(m, x, y)])
        return [None if p.grad is None else p.grad.clone() for p in params]

    _assert_same_grads(run(True), run(False))


def test_training_loop_matches_over_steps() -> None:
    """Several Adam steps, fresh forward each: the trajectories agree."""
    model = MultiTaskMLP(n_tasks=3)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    models = [copy.deepcopy(model), copy.deepcopy(model)]
    opts = [
        JDOptimizer(torch.optim.Adam(models[0].parameters(), lr=1e-2)),
        JDOptimizer(torch.optim.Adam(models[1].parameters(), lr=1e-2), modules=models[1]),
    ]
    for _ in range(5):
        for m, opt in zip(models, opts):
            opt.zero_grad()
            opt.step(task_losses(m, x, y))
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
