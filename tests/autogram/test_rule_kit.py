"""The public rule kit: a user rule written with ``jdoptim.autogram.rules``' public names only,
and the Gramian terms, each against an independent computation (an explicit Jacobian, the
``torch.func`` fallback, the Gram matrix of explicitly formed rows)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine
from jdoptim.autogram.rules import (
    Call,
    GenericRule,
    GramianTerm,
    IndexTerm,
    KernelTerm,
    LayerRule,
    RowsTerm,
    bias_rows,
    full_precision,
    linear_rows,
    register_rule,
    registered_rule,
    rows_gramian,
)

from ._oracle import assert_gramian_close, explicit_gramian


class GatedProjection(nn.Module):
    """``Y = (X ⊙ g) Wᵀ + β`` for a per-sample gate ``g`` given as a second argument: linear in
    ``W`` with inputs ``a = X ⊙ g``, which ``LinearLikeRule`` (one input) does not cover."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return (x * gate) @ self.weight.T + self.bias


class GatedProjectionByFallback(GatedProjection):
    """The same computation with ``forward`` overridden: the registry gives it no rule, so the
    engine's ``torch.func`` fallback differentiates it."""

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return super().forward(x, gate)


@register_rule(GatedProjection)
class GatedProjectionRule(LayerRule):
    r"""``a_{is} = X_{is} ⊙ g_{is}`` and ``D``: one kernel term for the weight and the bias;
    rows ``Σ_s D_{k,is} a_{is}ᵀ``; update ``D_wᵀ A`` with ``D_w = Σ_k w_{·k} D[k]``."""

    @classmethod
    def applies(cls, call: Call) -> bool:
        return len(call.args) == 2 and not call.kwargs

    def _inputs(self) -> Tensor:
        x, gate = self.call.args
        a = full_precision(x * gate)
        return self.call.samples_first(a).reshape(self.call.b, -1, a.shape[-1])  # [b, S, d]

    def _grads(self) -> Tensor:
        call = self.call
        out = call.module.weight.shape[0]  # type: ignore[index]
        return call.grad_samples_first(0).reshape(call.T, call.b, -1, out)  # [T, b, S, o]

    def _is_weight(self, p: Tensor) -> bool:
        return p is self.call.module.weight

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        weight = any(self._is_weight(p) for p in params)
        bias = any(not self._is_weight(p) for p in params)
        return [KernelTerm(self._inputs(), self._grads(), weight, bias)]

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        inputs, grads = self._inputs(), self._grads()
        return [
            linear_rows(inputs, grads) if self._is_weight(p) else bias_rows(grads) for p in params
        ]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        x, gate = self.call.args
        dw = self.call.weighted_grad(0, weights)
        dw = dw.reshape(-1, dw.shape[-1])
        a = (x * gate).reshape(-1, x.shape[-1]).to(dw.dtype)
        return [dw.T @ a if self._is_weight(p) else dw.sum(0) for p in params]


class Net(nn.Module):
    def __init__(self, layer: type[GatedProjection]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.gated = layer(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        return self.out(torch.tanh(self.gated(x, gate)))


def _step(model: Net, x: Tensor, gate: Tensor, batch_dim: int | None, weights: Tensor):
    """The engine's Gramian and weighted update for ``[batch, tasks]`` losses, the explicit
    Jacobian's Gramian and autograd's ``wᵀ J``, and the rules the engine used."""
    with Engine(model, batch_dim=batch_dim) as engine:
        out = model(x, gate).sin().reshape(x.shape[0], -1)
        losses = torch.stack([out.sum(1), out.pow(2).sum(1)], dim=1)  # [batch, 2 tasks]
        params = engine.parameters()
        expected = explicit_gramian(losses, params)
        wanted = torch.autograd.grad(losses, params, weights, retain_graph=True)
        step = engine.step(losses, params, [], per_sample=batch_dim is not None)
        with torch.no_grad():
            gramian = step.gramian()
            update, _ = step.gradients(weights)
        used = {type(parts.rule) for parts in step.rule_parameters}
    return gramian, expected, update, wanted, used


@pytest.mark.parametrize("batch_dim", [0, None])
@pytest.mark.parametrize("positions", [1, 3])
def test_user_rule_from_the_public_kit_is_exact(batch_dim: int | None, positions: int) -> None:
    """The user rule against the explicit Jacobian and against the fallback on the same model:
    same Gramian, same weighted update, and autograd's ``wᵀ J``."""
    assert registered_rule(GatedProjection(2, 2)) is GatedProjectionRule
    assert registered_rule(GatedProjectionByFallback(2, 2)) is None
    shape = (4, 5) if positions == 1 else (4, positions, 5)
    x = torch.randn(shape, dtype=torch.float64)
    gate = torch.rand(shape, dtype=torch.float64)
    weights = torch.rand(4, 2, dtype=torch.float64)
    mine = _step(Net(GatedProjection).double(), x, gate, batch_dim, weights)
    fallback = _step(Net(GatedProjectionByFallback).double(), x, gate, batch_dim, weights)
    assert GatedProjectionRule in mine[4] and GenericRule not in mine[4]
    assert GenericRule in fallback[4]
    gramian, expected, update, wanted, _ = mine
    assert_gramian_close(gramian, expected, rtol=1e-12)
    assert_gramian_close(gramian, fallback[0], rtol=1e-12)
    for actual, reference, other in zip(update, wanted, fallback[2]):
        torch.testing.assert_close(actual, reference)
        torch.testing.assert_close(actual, other)


def _random_linear(b: int, s: int, t: int, d: int = 3, o: int = 4):
    inputs = torch.randn(b, s, d, dtype=torch.float64)
    grads = torch.randn(t, b, s, o, dtype=torch.float64)
    weight_rows = torch.einsum("kiso,isd->ikod", grads, inputs).reshape(b, t, -1)  # definition
    return inputs, grads, weight_rows, grads.sum(2).transpose(0, 1)


def _gram(*rows: Tensor) -> Tensor:
    b, t = rows[0].shape[:2]
    flat = torch.cat([r.reshape(b * t, -1) for r in rows], dim=1)
    return (flat @ flat.T).reshape(b, t, b, t)


@pytest.mark.parametrize(("b", "s", "t"), [(3, 1, 1), (3, 4, 1), (1, 5, 3), (2, 3, 2), (6, 1, 2)])
@pytest.mark.parametrize(("weight", "bias"), [(True, False), (True, True), (False, True)])
def test_kernel_term_is_the_gram_matrix_of_its_rows(b, s, t, weight, bias) -> None:
    inputs, grads, weight_rows, bias_rows_ = _random_linear(b, s, t)
    rows = [r for r, on in ((weight_rows, weight), (bias_rows_, bias)) if on]
    expected = _gram(*rows)
    term = KernelTerm(inputs, grads, weight, bias)
    torch.testing.assert_close(term.gramian(), expected)
    torch.testing.assert_close(sum(RowsTerm(r).gramian() for r in term.rows()), expected)
    torch.testing.assert_close(term.from_factors(term.factors()).gramian(), expected)
    torch.testing.assert_close(sum(x.gramian() for x in term.exchanged()), expected)
    if s == 1 and t == 1:  # the 2-D layout of one position and one loss per sample
        flat = KernelTerm(inputs[:, 0], grads[0, :, 0], weight, bias)
        torch.testing.assert_close(flat.gramian(), expected)
        torch.testing.assert_close(sum(RowsTerm(r).gramian() for r in flat.rows()), expected)
        assert [f.shape[0] for f in flat.factors()] == [b, b]


def test_kernel_term_exchanges_the_narrower_of_factors_and_rows() -> None:
    narrow, _, _, _ = _random_linear(2, 1, 1, d=8, o=8)  # S (d + o) = 16 <= o d = 64
    term = KernelTerm(narrow, torch.randn(1, 2, 1, 8, dtype=torch.float64), True, True)
    assert [x.kind for x in term.exchanged()] == ["kernel"]
    inputs, grads, _, _ = _random_linear(2, 9, 1, d=2, o=2)  # 9 (2 + 2) > 4: rows
    term = KernelTerm(inputs, grads, True, True)
    assert [x.kind for x in term.exchanged()] == ["rows", "rows"]


def test_factors_gathered_from_shards_give_the_global_gramian() -> None:
    """What the distributed engine does: concatenate each shard's factors along the samples,
    rebuild the term, contract; equals the term of the whole batch."""
    inputs, grads, _, _ = _random_linear(5, 3, 1)
    whole = KernelTerm(inputs, grads, True, True)
    parts = [KernelTerm(inputs[:2], grads[:, :2], True, True), KernelTerm(inputs[2:], grads[:, 2:])]
    factors = [torch.cat(pieces) for pieces in zip(*(p.factors() for p in parts))]
    torch.testing.assert_close(parts[0].from_factors(factors).gramian(), whole.gramian())


def test_index_term_is_the_gram_matrix_of_one_hot_rows() -> None:
    vocabulary, b, s, t, e = 6, 3, 4, 2, 5
    index = torch.randint(0, vocabulary, (b, s))
    grads = torch.randn(t, b, s, e, dtype=torch.float64)
    one_hot = nn.functional.one_hot(index, vocabulary).double()  # [b, S, V]
    rows = torch.einsum("kise,isv->ikve", grads, one_hot)  # row (i, k): Σ_s D at idx_{is}
    expected = rows_gramian(rows)
    term = IndexTerm(index, grads)
    torch.testing.assert_close(term.gramian(), expected)
    torch.testing.assert_close(term.from_factors(term.factors()).gramian(), expected)
    assert term.factors()[0].dtype == torch.int64


def test_rows_term_per_loss() -> None:
    rows = torch.randn(1, 4, 3, 2, dtype=torch.float64)  # b = 1, T = 4 (task mode)
    term = RowsTerm.per_loss(rows)
    expected = rows.reshape(4, 6) @ rows.reshape(4, 6).T
    torch.testing.assert_close(term.gramian().reshape(4, 4), expected)
