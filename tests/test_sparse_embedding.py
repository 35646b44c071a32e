"""Sparse embeddings (``nn.Embedding(sparse=True)``, as multi-task recommendation models use them
with ``SparseAdam``): every path gives the exact step, and a sparse embedding's ``.grad`` is sparse
with the looked-up rows, as ``backward()`` gives it.

The oracle is the explicit Jacobian of the same losses, from one ``autograd.grad`` per loss, its
sparse rows made dense by torch's ``to_dense``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import jdoptim.scalarization as S
from jdoptim import JDOptimizer
from jdoptim.aggregation import PCGrad, UPGrad
from jdoptim.autogram import EngineRouteWarning
from jdoptim.linalg.finite import all_finite

D = torch.float64


class Recommender(nn.Module):
    """Two towers on a sparse item table (padding row 0) and a dense user projection."""

    def __init__(self, padding: int | None = 0) -> None:
        super().__init__()
        self.items = nn.Embedding(30, 6, padding_idx=padding, sparse=True)
        self.users = nn.Linear(4, 6)
        self.heads = nn.Linear(6, 2)

    def forward(self, items: Tensor, users: Tensor) -> Tensor:
        return self.heads(torch.tanh(self.items(items).mean(1) + self.users(users)))


def _batch() -> tuple[Tensor, Tensor]:
    torch.manual_seed(1)
    items = torch.randint(1, 30, (5, 4))
    items[0, 2:] = 0  # padding
    return items, torch.randn(5, 4, dtype=D)


def _jacobian(losses: Tensor, params: list[Tensor]) -> Tensor:
    rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
    return torch.stack([torch.cat([g.to_dense().reshape(-1) for g in row]) for row in rows])


def _flat(params: list[Tensor]) -> Tensor:
    return torch.cat([p.grad.to_dense().reshape(-1) for p in params])


def _looked_up(items: Tensor, padding: int | None) -> set[int]:
    return {i for i in items.reshape(-1).tolist() if i != padding}


@pytest.mark.parametrize("modules", [False, True], ids=["jacobian", "engine"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["tasks", "per-sample"])
def test_upgrad_step_is_exact_and_the_gradient_sparse(modules: bool, per_sample: bool) -> None:
    torch.manual_seed(0)
    model = Recommender().double()
    items, users = _batch()
    params = list(model.parameters())
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.1),
        UPGrad(),
        modules=model if modules else None,
        batch_dim=0 if per_sample else None,
        scope="all",
    )
    out = model(items, users)
    losses = out[:, 0] if per_sample else out.pow(2).mean(0)
    jacobian = _jacobian(losses, params)
    record = opt.step(losses)
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T)
    torch.testing.assert_close(_flat(params), jacobian.T @ record.weights)
    grad = model.items.weight.grad
    assert grad.layout is torch.sparse_coo
    assert set(grad.coalesce().indices()[0].tolist()) == _looked_up(items, 0)


def test_a_jacobian_method_gets_the_sparse_rows_too() -> None:
    torch.manual_seed(0)
    model = Recommender(padding=None).double()
    items, users = _batch()
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.1), PCGrad(), scope="all")
    losses = model(items, users).pow(2).mean(0)
    jacobian = _jacobian(losses, params)
    opt.step(losses)
    torch.testing.assert_close(_flat(params), PCGrad()(jacobian))
    assert model.items.weight.grad.layout is torch.sparse_coo


@pytest.mark.parametrize("modules", [False, True], ids=["jacobian", "engine"])
def test_sparse_adam_takes_the_step_of_the_sparse_gradient(modules: bool) -> None:
    # The embedding in SparseAdam (wrapped), the dense layers in Adam (foreign to the step).
    torch.manual_seed(0)
    model = Recommender().double()
    twin = copy.deepcopy(model)
    items, users = _batch()
    torch.optim.Adam([*model.users.parameters(), *model.heads.parameters()])
    opt = JDOptimizer(
        torch.optim.SparseAdam([model.items.weight], lr=0.05),
        UPGrad(),
        modules=model if modules else None,
    )
    losses = model(items, users).pow(2).mean(0)
    jacobian = _jacobian(losses, [model.items.weight])
    record = opt.step(list(losses))
    expected = (jacobian.T @ record.weights).reshape(30, 6)
    rows = torch.tensor(sorted(_looked_up(items, 0)))
    twin.items.weight.grad = torch.sparse_coo_tensor(rows[None], expected[rows], (30, 6))
    torch.optim.SparseAdam([twin.items.weight], lr=0.05).step()
    torch.testing.assert_close(model.items.weight, twin.items.weight)
    assert not torch.equal(model.items.weight, Recommender().double().items.weight)


class _FunctionalLookup(nn.Module):
    """A table used through ``F.embedding(..., sparse=True)`` by a module of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(30, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, items: Tensor) -> Tensor:
        return self.head(F.embedding(items, self.table, sparse=True).mean(1))


@pytest.mark.parametrize("hooked", ["whole", "head-only"])
@pytest.mark.parametrize("per_sample", [False, True], ids=["tasks", "per-sample"])
def test_a_functional_sparse_lookup_is_exact(hooked: str, per_sample: bool) -> None:
    # "whole": the module is re-run by the generic rule; "head-only": the table is used outside
    # every hooked module, so its rows come straight from autograd. Either way the gradient is
    # dense (no layer rule gives it back sparse) and exact.
    torch.manual_seed(0)
    model = _FunctionalLookup().double()
    items, _ = _batch()
    params = list(model.parameters())
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.1),
        UPGrad(),
        modules=model if hooked == "whole" else [model.head],
        batch_dim=0 if per_sample else None,
        scope="all",
    )
    out = model(items)
    losses = out[:, 0] if per_sample else out.pow(2).mean(0)
    jacobian = _jacobian(losses, params)
    if per_sample and hooked == "head-only":  # the table's rows need one backward per loss
        with pytest.warns(EngineRouteWarning, match="used outside"):
            record = opt.step(losses)
    else:
        record = opt.step(losses)
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T)
    torch.testing.assert_close(_flat(params), jacobian.T @ record.weights)


@pytest.mark.parametrize("method", ["UW", "features"])
def test_loss_methods_and_features_give_the_sparse_backward(method: str) -> None:
    torch.manual_seed(0)
    model = Recommender().double()
    twin = copy.deepcopy(model)
    items, users = _batch()
    if method == "UW":
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), S.UW(2).double())
        opt.step(list(model(items, users).pow(2).mean(0)))
        expected = torch.autograd.grad(
            0.5 * twin(items, users).pow(2).mean(0).sum(), twin.items.weight
        )[0]  # UW's weights e^{-0}/2 at the first step
    else:
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
        z = torch.tanh(model.items(items).mean(1) + model.users(users))
        record = opt.step(list(model.heads(z).pow(2).mean(0)), features=z)
        losses = twin(items, users).pow(2).mean(0)
        expected = torch.autograd.grad(record.weights @ losses, twin.items.weight)[0]
    grad = model.items.weight.grad
    assert grad.layout is torch.sparse_coo
    torch.testing.assert_close(grad.to_dense(), expected.to_dense())


def test_finiteness_check_reads_the_values_of_a_sparse_gradient() -> None:
    rows = torch.tensor([[1, 3]])
    finite = torch.sparse_coo_tensor(rows, torch.ones(2, 6), (20, 6))
    assert all_finite([finite, torch.ones(3)])
    for bad in (float("nan"), float("inf")):
        values = torch.ones(2, 6)
        values[1, 2] = bad
        assert not all_finite([torch.sparse_coo_tensor(rows, values, (20, 6)), torch.ones(3)])
