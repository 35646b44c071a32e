"""An embedding's Gramian from the pairs of positions that read the same row
(:mod:`jdoptim.autogram.rules._index_pairs`): against the definition
``Σ_{s,r} [idx_is = idx_jr] ⟨D_is, D_jr⟩`` written out with a one-hot matrix, and, through the
engine at batches where it is taken, against the explicit Jacobian of the same losses."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import jdoptim.autogram.rules._index_pairs as index_pairs
from jdoptim.autogram import Engine
from jdoptim.autogram.rules import IndexTerm

from ._oracle import as_square, assert_gramian_close, explicit_jacobian


def _by_definition(index: Tensor, grads: Tensor, rows: int) -> Tensor:
    """``G[i,k,j,l]`` from the explicit rows ``g_{ik} = Σ_s D[k,i,s] onehot(idx_is)ᵀ``."""
    t, b, _, e = grads.shape
    onehot = torch.nn.functional.one_hot(index, rows).to(grads.dtype)  # [b, S, V]
    jac = torch.einsum("kiso,isv->ikvo", grads, onehot).reshape(b * t, rows * e)
    return (jac @ jac.T).reshape(b, t, b, t)


@pytest.mark.parametrize("tasks", [1, 3])
@pytest.mark.parametrize("rows", [2, 7, 400])
@pytest.mark.parametrize("chunk", [1, 5, 1 << 18])
def test_pairs_gramian_by_definition(tasks: int, rows: int, chunk: int, monkeypatch) -> None:
    """Every row count (a row read by every sample; rows read once), several tasks, and pairs
    taken in chunks of 1 and 5 (a chunk boundary inside a row's pairs) or all at once."""
    monkeypatch.setattr(index_pairs, "_PAIRS_PER_CHUNK", chunk)
    torch.manual_seed(0)
    index = torch.randint(0, rows, (6, 5))
    index[2] = index[0]  # (repeated rows within and across samples)
    grads = torch.randn(tasks, 6, 5, 3, dtype=torch.float64)
    grads[:, 1, 2] = 0.0  # (a padding position: no gradient)
    actual = index_pairs.index_pairs_gramian(index, grads)
    torch.testing.assert_close(actual, _by_definition(index, grads, rows), rtol=1e-12, atol=1e-12)


def test_pairs_are_taken_where_they_are_fewer() -> None:
    """Many positions over a vocabulary: the pairs (also when every position reads one row:
    merged per sample, they are ``b²`` pairs against ``(bS)²``); few positions, or one position
    per sample all reading one row (``b²`` pairs, as many as the kernel's): the kernel."""
    vocabulary = torch.randint(0, 5000, (64, 16))
    grads = torch.zeros(1, 64, 16, 2)
    assert index_pairs.pairs_are_cheaper(vocabulary, grads)
    assert not index_pairs.pairs_are_cheaper(vocabulary[:8], grads[:, :8])  # 128 positions
    assert index_pairs.pairs_are_cheaper(torch.zeros(64, 16, dtype=torch.long), grads)
    one = torch.zeros(1024, 1, dtype=torch.long)
    assert not index_pairs.pairs_are_cheaper(one, torch.zeros(1, 1024, 1, 2))


def test_index_term_takes_the_pairs_and_agrees_with_the_kernel() -> None:
    """:class:`IndexTerm`'s Gramian at 1,024 positions (the pairs) equals the one-hot rows'."""
    torch.manual_seed(0)
    index = torch.randint(0, 300, (64, 16))
    grads = torch.randn(2, 64, 16, 4, dtype=torch.float64)
    assert index_pairs.pairs_are_cheaper(index, grads)
    term = IndexTerm(index, grads)
    torch.testing.assert_close(
        term.gramian(), _by_definition(index, grads, 300), rtol=1e-12, atol=1e-10
    )


class _Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(300, 4, padding_idx=0)
        self.head = nn.Linear(4, 2)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.wte(idx))).pow(2).sum(1)  # [b, 2]


@pytest.mark.parametrize("layout", ["per-sample", "batch x tasks"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_engine_gramian_at_many_positions(layout: str, low_memory: bool) -> None:
    """The engine at 48 samples of 16 tokens (768 positions: the pairs), padding included,
    against the explicit Jacobian of the same losses."""
    torch.manual_seed(0)
    model = _Tokens().double()
    idx = torch.randint(0, 300, (48, 16))
    idx[:, -3:] = 0  # padding
    params = list(model.parameters())
    with Engine(model, batch_dim=0, low_memory=low_memory) as engine:
        for _ in range(2):
            out = model(idx)
            losses = out.sum(1) if layout == "per-sample" else out
            jacobian = explicit_jacobian(losses, params)
            gramian = engine.compute_gramian(losses)
            square = as_square(gramian, tuple(losses.shape))
            assert_gramian_close(square, jacobian @ jacobian.T, rtol=1e-10)
