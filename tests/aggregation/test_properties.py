"""Cross-method properties, parametrised over every aggregator and weighting of
:mod:`jdoptim.aggregation` and over the sampled Jacobians of :mod:`tests.aggregation.matrices`.

1. non-differentiable methods return outputs without ``grad_fn``; differentiable ones keep one;
2. every :class:`GramianWeightedAggregator` equals its weighting composed with ``J Jᵀ``;
3. non-conflict ``J d ≥ 0`` where the method's paper promises it (see :class:`Entry`);
4. permutation equivariance (``A(PJ) = A(J)``, ``W(PGPᵀ) = P W(G)``) of deterministic,
   index-blind methods;
5. finite outputs on zero rows, duplicated rows, ``m = 1`` (or a clear error below a method's
   minimum number of rows);
6. the input validation of :mod:`jdoptim.aggregation._bases`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from torch import Tensor

import jdoptim.aggregation as agg
from jdoptim.aggregation import Aggregator, GramianWeightedAggregator

from .matrices import MATRICES, full_rank

NonConflict = Literal["always", "two_rows", "independent_rows", "no"]


@dataclass(frozen=True)
class Entry:
    """One method of the registry.

    Attributes:
        name: test id.
        make: builds a fresh aggregator for ``m`` losses (fixed seeds: two calls give two
            instances with the same trajectory).
        differentiable: whether the aggregator's output must keep a ``grad_fn``.
        non_conflict: where ``J d ≥ 0`` is promised: ``"always"`` (UPGrad, DualProj, MGDA:
            projections onto / minimum norm in the dual cone), ``"two_rows"`` (PCGrad, Yu et al.
            2020, Theorem 1), ``"independent_rows"`` (ConFIG: ``U ĝ = p > 0``; Nash-MTL:
            ``(G α)_i = 1/α_i > 0``; FairGrad: ``(G w)_i = w_i^{-1/α} > 0``; all need linearly
            independent rows), ``"no"`` (no promise).
        equivariant: deterministic (for a fixed seed) and blind to the rows' indices.
        min_rows: fewer rows must raise a ``ValueError``.
    """

    name: str
    make: Callable[[int], Aggregator]
    differentiable: bool = False
    non_conflict: NonConflict = "no"
    equivariant: bool = True
    min_rows: int = 1


def _constant(m: int) -> Aggregator:
    return agg.Constant(torch.linspace(0.5, 1.5, m, dtype=torch.float64))


REGISTRY: list[Entry] = [
    # Baselines.
    Entry("Mean", lambda m: agg.Mean(), differentiable=True),
    Entry("Sum", lambda m: agg.Sum(), differentiable=True),
    Entry("Constant", _constant, differentiable=True, equivariant=False),
    # Part A: projection and balancing methods.
    Entry("UPGrad", lambda m: agg.UPGrad(), non_conflict="always"),
    Entry("DualProj", lambda m: agg.DualProj(), non_conflict="always"),
    Entry("MGDA", lambda m: agg.MGDA(), non_conflict="always"),
    Entry("CAGrad", lambda m: agg.CAGrad()),
    Entry("NashMTL", lambda m: agg.NashMTL(), non_conflict="independent_rows"),
    Entry("IMTLG", lambda m: agg.IMTLG()),
    Entry("AlignedMTL", lambda m: agg.AlignedMTL()),
    Entry("FairGrad", lambda m: agg.FairGrad(), non_conflict="independent_rows"),
    # Part B: conflict surgery and robust methods.
    Entry(
        "PCGrad-sum-random",
        lambda m: agg.PCGrad(seed=0),
        non_conflict="two_rows",
        equivariant=False,
    ),
    Entry(
        "PCGrad-mean-fixed",
        lambda m: agg.PCGrad("mean", "fixed"),
        non_conflict="two_rows",
        equivariant=False,
    ),
    Entry("GradVac", lambda m: agg.GradVac(seed=0), equivariant=False),
    Entry("GradVac-fixed", lambda m: agg.GradVac(beta=0.5, order="fixed"), equivariant=False),
    Entry("GradDrop", lambda m: agg.GradDrop(seed=0)),  # thresholds are per coordinate
    Entry("ConFIG", lambda m: agg.ConFIG(), non_conflict="independent_rows"),
    Entry("Random", lambda m: agg.Random(seed=0), equivariant=False),
    Entry("Krum", lambda m: agg.Krum(n_byzantine=1, n_selected=2), min_rows=4),
    Entry("TrimmedMean", lambda m: agg.TrimmedMean(trim_number=1), min_rows=3),
    Entry("ExcessMTL", lambda m: agg.ExcessMTL()),
]

IDS = [e.name for e in REGISTRY]
GRAMIAN_BASED = [e for e in REGISTRY if isinstance(e.make(3), GramianWeightedAggregator)]
GRAMIAN_IDS = [e.name for e in GRAMIAN_BASED]
# Matrices with two rows, where PCGrad promises non-conflict.
TWO_ROWS = [full_rank(2, 5, 200), full_rank(2, 2, 201), torch.tensor([[1.0, 0.0], [-1.0, 0.1]])]


def _call(entry: Entry, matrix: Tensor) -> Tensor:
    return entry.make(matrix.shape[0])(matrix)


def _cases(entries: list[Entry]) -> list:
    """(entry, matrix) pairs over MATRICES, leaving out matrices with fewer rows than the method
    accepts (those are checked by test_too_few_rows)."""
    return [
        pytest.param(entry, matrix, id=f"{entry.name}-{name}")
        for entry in entries
        for name, matrix in MATRICES
        if matrix.shape[0] >= entry.min_rows
    ]


# 1. Differentiability -----------------------------------------------------------------------


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_differentiability_of_aggregators(entry: Entry) -> None:
    matrix = full_rank(5, 6, 210).requires_grad_()
    output = _call(entry, matrix)
    assert (output.grad_fn is not None) == entry.differentiable


@pytest.mark.parametrize(
    "entry",
    [e for e in GRAMIAN_BASED if not e.differentiable],
    ids=[e.name for e in GRAMIAN_BASED if not e.differentiable],
)
def test_non_differentiable_weightings_detach(entry: Entry) -> None:
    matrix = full_rank(5, 6, 211).requires_grad_()
    weighting = entry.make(5).weighting  # type: ignore[union-attr]
    assert weighting(matrix @ matrix.T).grad_fn is None


# 2. Aggregator = weighting ∘ Gramian --------------------------------------------------------


@pytest.mark.parametrize(("entry", "matrix"), _cases(GRAMIAN_BASED))
def test_aggregator_is_weighting_of_gramian(entry: Entry, matrix: Tensor) -> None:
    aggregator = entry.make(matrix.shape[0])
    weighting = entry.make(matrix.shape[0]).weighting  # type: ignore[union-attr]
    expected = weighting(matrix @ matrix.T) @ matrix
    scale = matrix.abs().max() * matrix.shape[0]
    torch.testing.assert_close(aggregator(matrix), expected, rtol=1e-6, atol=1e-9 * scale)


# 3. Non-conflict ----------------------------------------------------------------------------


def _non_conflict_cases() -> list:
    cases = []
    for entry in REGISTRY:
        if entry.non_conflict == "always":
            matrices = list(MATRICES)
        elif entry.non_conflict == "two_rows":
            matrices = [(f"two_rows_{k}", x.double()) for k, x in enumerate(TWO_ROWS)]
        elif entry.non_conflict == "independent_rows":
            independent = ["full_rank_3x10", "full_rank_5x5", "single_1x7", "scaled_5x8"]
            matrices = [(name, x) for name, x in MATRICES if name in independent]
        else:
            continue
        cases += [pytest.param(entry, x, id=f"{entry.name}-{name}") for name, x in matrices]
    return cases


@pytest.mark.parametrize(("entry", "matrix"), _non_conflict_cases())
def test_non_conflict(entry: Entry, matrix: Tensor) -> None:
    direction = _call(entry, matrix)
    # ⟨g_i, d⟩ ≥ -1e-7 ‖g_i‖ ‖J‖_F: scale-free, and tolerant of a d that should be exactly 0 (a
    # trivial dual cone) but comes out as rounding noise.
    products = matrix @ direction
    tolerance = 1e-7 * matrix.norm(dim=1) * matrix.norm()
    assert (products >= -tolerance).all(), products


# 4. Permutation equivariance ----------------------------------------------------------------


EQUIVARIANT = [e for e in REGISTRY if e.equivariant]


@pytest.mark.parametrize(("entry", "matrix"), _cases(EQUIVARIANT))
def test_permutation_equivariance(entry: Entry, matrix: Tensor) -> None:
    m = matrix.shape[0]
    permutation = torch.randperm(m, generator=torch.Generator().manual_seed(m))
    scale = matrix.abs().max() * m
    torch.testing.assert_close(
        _call(entry, matrix[permutation]), _call(entry, matrix), rtol=1e-6, atol=1e-8 * scale
    )
    aggregator = entry.make(m)
    if isinstance(aggregator, GramianWeightedAggregator):
        gramian = matrix @ matrix.T
        weights = aggregator.weighting(gramian)
        permuted = entry.make(m).weighting(gramian[permutation][:, permutation])  # type: ignore[union-attr]
        # Weights are only determined up to the null space of Jᵀ: compare the directions.
        torch.testing.assert_close(
            permuted @ matrix[permutation], weights @ matrix, rtol=1e-6, atol=1e-8 * scale
        )


# 5. Degenerate inputs -----------------------------------------------------------------------


@pytest.mark.parametrize(("entry", "matrix"), _cases(REGISTRY))
def test_finite_outputs(entry: Entry, matrix: Tensor) -> None:
    aggregator = entry.make(matrix.shape[0])
    for _ in range(2):  # stateful methods: the second call uses the state of the first
        output = aggregator(matrix)
        assert output.shape == (matrix.shape[1],)
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_all_zero_jacobian(entry: Entry) -> None:
    m = max(entry.min_rows, 3)
    output = _call(entry, torch.zeros(m, 4, dtype=torch.float64))
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output, torch.zeros(4, dtype=torch.float64))


@pytest.mark.parametrize(
    "entry",
    [e for e in REGISTRY if e.min_rows > 1],
    ids=[e.name for e in REGISTRY if e.min_rows > 1],
)
def test_too_few_rows(entry: Entry) -> None:
    m = entry.min_rows - 1
    with pytest.raises(ValueError):
        _call(entry, full_rank(m, 4, 220))


# 6. Input validation of _bases --------------------------------------------------------------


BAD_MATRICES = [
    pytest.param(torch.ones(4, dtype=torch.float64), ValueError, id="1-D"),
    pytest.param(torch.ones(2, 3, 4, dtype=torch.float64), ValueError, id="3-D"),
    pytest.param(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, id="nan"),
    pytest.param(torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, id="inf"),
    pytest.param(torch.ones(3, 3, dtype=torch.int64), TypeError, id="integer"),
]


@pytest.mark.parametrize(("matrix", "error"), BAD_MATRICES)
@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_aggregators_reject_bad_jacobians(entry: Entry, matrix: Tensor, error: type) -> None:
    with pytest.raises(error):
        entry.make(3)(matrix)


BAD_GRAMIANS = [
    pytest.param(torch.ones(3, 4, dtype=torch.float64), ValueError, "square", id="non-square"),
    pytest.param(torch.ones(3, dtype=torch.float64), ValueError, "square", id="1-D"),
    pytest.param(
        torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]),
        ValueError,
        "symmetric",
        id="non-symmetric",
    ),
    pytest.param(torch.diag(torch.tensor([1.0, float("nan"), 1.0])), ValueError, "NaN", id="nan"),
    pytest.param(torch.diag(torch.tensor([1.0, float("inf"), 1.0])), ValueError, "NaN", id="inf"),
    pytest.param(torch.eye(3, dtype=torch.int64), TypeError, "floating", id="integer"),
]


@pytest.mark.parametrize(("gramian", "error", "message"), BAD_GRAMIANS)
@pytest.mark.parametrize("entry", GRAMIAN_BASED, ids=GRAMIAN_IDS)
def test_weightings_reject_bad_gramians(
    entry: Entry, gramian: Tensor, error: type, message: str
) -> None:
    weighting = entry.make(3).weighting  # type: ignore[union-attr]
    with pytest.raises(error, match=message):
        weighting(gramian)
