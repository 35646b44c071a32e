"""Tests of the validation in ``_bases`` and of the ``_NonDifferentiable`` / ``Stateful`` mixins."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import Aggregator, GramianWeightedAggregator, Stateful, Weighting
from jdoptim.aggregation._bases import check_gramian, check_matrix, check_preference
from jdoptim.aggregation._mixins import _NonDifferentiable


class _Squares(Weighting):
    """w = diag(G): differentiable in G, so the mixin's effect is observable."""

    def forward(self, gramian: Tensor) -> Tensor:
        return gramian.diagonal().clone()


class _DetachedSquares(_NonDifferentiable, _Squares):
    pass


class _Counter(Stateful, Weighting):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, gramian: Tensor) -> Tensor:
        self.calls += 1
        return torch.full((gramian.shape[0],), float(self.calls), dtype=gramian.dtype)

    def reset(self) -> None:
        self.calls = 0


def test_check_matrix() -> None:
    check_matrix(torch.zeros(0, 3))
    check_matrix(torch.ones(2, 3))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        check_matrix([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"2-D Jacobian of shape \[m, n\]"):
        check_matrix(torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        check_matrix(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_matrix(torch.tensor([[0.0, -float("inf")]]))


def test_check_gramian() -> None:
    check_gramian(torch.eye(3))
    # Symmetry is checked relatively to the largest entry.
    check_gramian(torch.tensor([[1e6, 1.0], [1.0 + 1e-3, 1e6]]))
    with pytest.raises(ValueError, match="symmetric"):
        check_gramian(torch.tensor([[1.0, 0.1], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="square"):
        check_gramian(torch.ones(2, 3))
    with pytest.raises(TypeError, match="Gramian"):
        check_gramian(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_gramian(torch.full((2, 2), float("nan")))


def test_check_preference() -> None:
    check_preference(None, 3)
    check_preference(torch.ones(3), 3)
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        check_preference(torch.ones(3), 4)
    with pytest.raises(ValueError):
        check_preference(torch.ones(1, 3), 3)
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_preference(torch.tensor([1.0, float("inf"), 0.0]), 3)


def test_weighting_and_aggregator_validate_before_forward() -> None:
    weighting = _Squares()
    with pytest.raises(ValueError, match="symmetric"):
        weighting(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        GramianWeightedAggregator(weighting)(torch.ones(3))


def test_non_differentiable_mixin_detaches() -> None:
    matrix = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    gramian = matrix @ matrix.T
    assert _Squares()(gramian).grad_fn is not None  # without the mixin: differentiable
    detached = _DetachedSquares()(gramian)
    assert detached.grad_fn is None
    torch.testing.assert_close(detached, (matrix.detach() ** 2).sum(dim=1))
    assert torch.is_grad_enabled()  # the no-grad context does not leak


def test_gramian_weighted_aggregator_composes() -> None:
    matrix = torch.randn(3, 5, dtype=torch.float64)
    expected = (matrix**2).sum(dim=1) @ matrix
    torch.testing.assert_close(GramianWeightedAggregator(_Squares())(matrix), expected)
    assert repr(GramianWeightedAggregator(_Squares())) == "GramianWeightedAggregator()"


def test_bases_are_abstract() -> None:
    with pytest.raises(TypeError):
        Weighting()  # type: ignore[abstract]
    with pytest.raises(TypeError):
        Aggregator()  # type: ignore[abstract]


def test_stateful_reset() -> None:
    counter = _Counter()
    gramian = torch.eye(2, dtype=torch.float64)
    counter(gramian)
    assert counter(gramian)[0] == 2.0
    counter.reset()
    assert counter(gramian)[0] == 1.0


def test_a_stateful_method_without_reset_cannot_be_built():

    from jdoptim.aggregation import Stateful, Weighting

    class Forgetful(Stateful, Weighting):
        def forward(self, gramian: Tensor) -> Tensor:
            return gramian.diagonal()

    with pytest.raises(TypeError, match="reset"):
        Forgetful()
