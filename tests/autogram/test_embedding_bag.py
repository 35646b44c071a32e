"""``nn.EmbeddingBag``'s rule against the explicit Jacobian of the same losses (float64).

Bags from a ``[bags, L]`` input or from a flat input and ``offsets`` (bags of different sizes,
an empty one, ``include_last_offset``), ``"sum"`` (with and without per-sample weights) and
``"mean"``, ``padding_idx``, one bag per sample or two (sample-major: two features per sample),
``sparse=True``; per-sample, ``[batch, tasks]`` and task losses, the default and the low-memory
step, two steps each. The rule takes the calls (no ``EngineRouteWarning``, an error in this
suite: before it, a bag with offsets took the generic rule's re-run on the whole batch);
``"max"`` mode stays with the generic rule, exact.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram.rules.embedding_bag import EmbeddingBagRule

from ._same_losses import check_gramian, check_step

VOCAB = 13


class _Recommender(nn.Module):
    """Bags of item ids → a tower with two heads. ``layout``: ``"2d"`` (``[b·per_sample, 4]``
    ids), ``"offsets"`` (flat ids, bags of 0–5 entries) or ``"last"`` (the same with
    ``include_last_offset``); ``per_sample`` bags per sample, side by side in the tower's
    input."""

    def __init__(self, mode: str, layout: str, weighted: bool, padding: bool, per_sample: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(
            VOCAB,
            3,
            mode=mode,
            padding_idx=0 if padding else None,
            include_last_offset=layout == "last",
        )
        self.tower = nn.Linear(3 * per_sample, 2)
        self.layout, self.weighted, self.per_sample = layout, weighted, per_sample

    def forward(self, b: int, generator: torch.Generator) -> Tensor:
        bags = b * self.per_sample
        if self.layout == "2d":
            ids, offsets = torch.randint(0, VOCAB, (bags, 4), generator=generator), None
        else:
            sizes = torch.randint(0, 6, (bags,), generator=generator)
            sizes[1] = 0  # an empty bag
            ids = torch.randint(0, VOCAB, (int(sizes.sum()),), generator=generator)
            offsets = torch.cumsum(sizes, 0) - sizes
            if self.layout == "last":
                offsets = torch.cat([offsets, sizes.sum()[None]])
        weights = None
        if self.weighted:
            weights = torch.rand(ids.shape, generator=generator, dtype=torch.float64)
        looked = self.bag(ids, offsets, per_sample_weights=weights)  # [bags, 3]
        return self.tower(torch.tanh(looked.reshape(b, -1)))  # [b, 2]


def _losses_of(model: _Recommender, layout: str):
    generator = torch.Generator().manual_seed(0)

    def losses() -> Tensor:
        out = model(4, generator).pow(2)  # [b, 2]
        if layout == "per-sample":
            return out[:, 0]
        return out if layout == "batch-tasks" else out.mean(0)

    return losses


CASES = [
    ("sum", "2d", False, False, 1),
    ("mean", "2d", False, True, 1),
    ("sum", "offsets", True, False, 1),
    ("mean", "offsets", False, True, 2),
    ("sum", "last", False, True, 2),
    ("mean", "last", False, False, 1),
]


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks", "tasks"])
@pytest.mark.parametrize("mode, bags, weighted, padding, per_sample", CASES)
def test_embedding_bag_is_exact(
    mode: str, bags: str, weighted: bool, padding: bool, per_sample: int, layout: str,
    low_memory: bool,
) -> None:  # fmt: skip
    torch.manual_seed(0)
    model = _Recommender(mode, bags, weighted, padding, per_sample).double()
    batch_dim = None if layout == "tasks" else 0
    losses = _losses_of(model, layout)
    for _ in range(2):
        check_gramian(model, losses, batch_dim, rtol=1e-12, low_memory=low_memory)
        check_step(model, losses, batch_dim, rtol=1e-10, low_memory=low_memory)


@pytest.mark.parametrize("mode, bags, weighted, padding, per_sample", CASES)
def test_the_rule_takes_the_calls(
    mode: str, bags: str, weighted: bool, padding: bool, per_sample: int
) -> None:
    model = _Recommender(mode, bags, weighted, padding, per_sample).double()
    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            step = engine.step(_losses_of(model, "per-sample")(), params, [], per_sample=True)
            rules = [type(parts.rule) for parts in step.rule_parameters]
            assert step.b == 4 and EmbeddingBagRule in rules


def test_max_mode_takes_the_generic_rule_exactly() -> None:
    torch.manual_seed(0)
    model = _Recommender("max", "offsets", False, False, 1).double()
    model.bag.padding_idx = None
    # (its re-run on one sample's bags fails under torch.func: the whole call is re-run
    # eagerly, masked per sample, on the per-sample path, without a route warning)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        check_gramian(model, _losses_of(model, "per-sample"), 0, rtol=1e-12)


@pytest.mark.parametrize("padding", [False, True])
def test_sparse_update_as_backward_gives_it(padding: bool) -> None:
    """With ``sparse=True``: a sparse ``.grad`` holding the looked-up rows (padding left out),
    the rows autograd's own sparse gradient holds, with the values of the same step on the
    dense twin of the model (whose exactness the tests above check)."""
    torch.manual_seed(0)
    dense = _Recommender("sum", "offsets", True, padding, 1).double()
    sparse = _Recommender("sum", "offsets", True, padding, 1).double()
    sparse.load_state_dict(dense.state_dict())
    sparse.bag.sparse = True
    grads = []
    for model in (dense, sparse):
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), modules=model)
        out = model(4, torch.Generator().manual_seed(0))
        opt.step([out[:, 0].sum(), out[:, 1].sum()])
        grads.append(model.bag.weight.grad)
    dense_grad, sparse_grad = grads
    assert sparse_grad is not None and sparse_grad.is_sparse
    torch.testing.assert_close(sparse_grad.to_dense(), dense_grad, rtol=1e-12, atol=1e-14)
    sparse.zero_grad()
    sparse(4, torch.Generator().manual_seed(0)).sum().backward()  # autograd's own sparse rows
    own = sparse.bag.weight.grad
    assert own is not None
    rows = set(sparse_grad.coalesce().indices()[0].tolist())
    assert rows == set(own.coalesce().indices()[0].tolist())
