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

from .matrices import (
    DEGENERATE,
    MATRICES,
    full_rank,
    not_weakly_stationary,
    strongly_stationary,
    weakly_not_strongly_stationary,
)

NonConflict = Literal["always", "two_rows", "independent_rows", "no"]
Stationarity = Literal["strong", "weak", "no"]


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
        degree: ``A(cJ) = c^degree A(J)`` for every ``c > 0`` (positive homogeneity; ``1`` for
            most methods, ``0`` for FairGrad with ``α = 1``, whose ``w(c²G) = c^{-1} w(G)``),
            ``None`` where the method has no such law (Nash-MTL's norm clipping, ExcessMTL's
            ``ε``).
        stationarity: ``"strong"``: ``A(J) = 0`` only if ``Jᵀw = 0`` for some ``w > 0``
            (positive weights: Mean, Sum, Constant, Random; UPGrad and DualProj, Quinton & Rey
            2024; ConFIG, whose ``U ĝ = p > 0`` on independent rows); ``"weak"``: ``A(J) = 0``
            exactly when ``0`` is in the convex hull of the rows (MGDA, Désidéri 2012).
        continuous: ``A`` is continuous at the degenerate inputs of ``DEGENERATE`` (zero,
            identical, opposite rows, rank one, ``m = 1``, ``n = 1``): fixed or positive
            weights, minimum-norm points and projections onto polyhedral cones, order statistics.
    """

    name: str
    make: Callable[[int], Aggregator]
    differentiable: bool = False
    non_conflict: NonConflict = "no"
    equivariant: bool = True
    min_rows: int = 1
    degree: float | None = 1.0
    stationarity: Stationarity = "no"
    continuous: bool = False


def _constant(m: int) -> Aggregator:
    return agg.Constant(torch.linspace(0.5, 1.5, m, dtype=torch.float64))


REGISTRY: list[Entry] = [
    # Baselines.
    Entry(
        "Mean", lambda m: agg.Mean(), differentiable=True, stationarity="strong", continuous=True
    ),
    Entry("Sum", lambda m: agg.Sum(), differentiable=True, stationarity="strong", continuous=True),
    Entry(
        "Constant",
        _constant,
        differentiable=True,
        equivariant=False,
        stationarity="strong",
        continuous=True,
    ),
    # Part A: projection and balancing methods.
    Entry(
        "UPGrad",
        lambda m: agg.UPGrad(),
        non_conflict="always",
        stationarity="strong",
        continuous=True,
    ),
    Entry(
        "DualProj",
        lambda m: agg.DualProj(),
        non_conflict="always",
        stationarity="strong",
        continuous=True,
    ),
    Entry(
        "MGDA", lambda m: agg.MGDA(), non_conflict="always", stationarity="weak", continuous=True
    ),
    Entry("CAGrad", lambda m: agg.CAGrad()),
    Entry("NashMTL", lambda m: agg.NashMTL(), non_conflict="independent_rows", degree=None),
    Entry(
        "NashMTL-unclipped",
        lambda m: agg.NashMTL(max_norm=0.0),
        non_conflict="independent_rows",
    ),
    Entry("IMTLG", lambda m: agg.IMTLG()),
    Entry("AlignedMTL", lambda m: agg.AlignedMTL()),
    Entry("FairGrad", lambda m: agg.FairGrad(), non_conflict="independent_rows", degree=0.0),
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
    Entry("ConFIG", lambda m: agg.ConFIG(), non_conflict="independent_rows", stationarity="strong"),
    Entry("Random", lambda m: agg.Random(seed=0), equivariant=False, stationarity="strong"),
    Entry("Krum", lambda m: agg.Krum(n_byzantine=1, n_selected=2), min_rows=4),
    Entry("TrimmedMean", lambda m: agg.TrimmedMean(trim_number=1), min_rows=3, continuous=True),
    Entry("ExcessMTL", lambda m: agg.ExcessMTL(), degree=None),
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


# 7. Positive homogeneity and extreme scales --------------------------------------------------

HOMOGENEOUS = [e for e in REGISTRY if e.degree is not None]
# Well-conditioned families: in float32 a rank-deficient matrix is only rank-deficient up to
# rounding, and the methods that invert a Gramian legitimately amplify that rounding.
WELL_CONDITIONED = [
    (name, x) for name, x in MATRICES if name in ("full_rank_3x10", "full_rank_5x5")
]
WELL_CONDITIONED.append(("scaled_5x8", dict(MATRICES)["scaled_5x8"]))
# (dtype, scale): the gradients' size. The Gramian of the smallest under- and of the largest
# overflows in its dtype unless the method normalises first.
EXTREME_SCALES = [
    (torch.float32, 1e-30),
    (torch.float32, 1e30),
    (torch.float64, 1e-200),
    (torch.float64, 1e200),
]
RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}
#: Gramians of rows of norms 1e-3 … 1e3 have a condition number of about 1e12: a method that
#: inverts one (IMTL-G, Aligned-MTL, …) may turn a rounding of the input into this much more.
CONDITIONING = {"scaled_5x8": 1e5}


def _undeclared(entry: Entry) -> bool:
    """Whether ``entry`` is a Gramian-based method whose weighting does not declare its
    ``scale_degree`` (yet), so that its aggregator forms the Gramian of ``J`` unnormalised."""
    aggregator = entry.make(3)
    return (
        isinstance(aggregator, GramianWeightedAggregator)
        and type(aggregator).forward is GramianWeightedAggregator.forward
        and aggregator.weighting.scale_degree is None
    )


def _families(entry: Entry) -> list[tuple[Tensor, float]]:
    """The well-conditioned matrices ``entry`` accepts, each with its conditioning factor."""
    return [
        (matrix, CONDITIONING.get(name, 1.0))
        for name, matrix in WELL_CONDITIONED
        if matrix.shape[0] >= entry.min_rows
    ]


def _assert_scaled(actual: Tensor, expected: Tensor, rtol: float) -> None:
    """``actual ≈ expected`` relative to ``‖expected‖`` (both cast to float64)."""
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all()
    error = float((actual - expected).norm())
    assert error <= rtol * float(expected.norm()) + 1e-300, (error, float(expected.norm()))


@pytest.mark.parametrize("entry", HOMOGENEOUS, ids=lambda e: e.name)
def test_positive_homogeneity(entry: Entry) -> None:
    """``A(cJ) = c^k A(J)``, ``c`` a power of two (exact to the last bit) or not, in float64."""
    assert entry.degree is not None
    for matrix, condition in _families(entry):
        reference = _call(entry, matrix)
        for c in (0.25, 2.0**40):
            torch.testing.assert_close(_call(entry, c * matrix), c**entry.degree * reference)
        for c in (3.7, 1e-3, 1e4):
            expected = c**entry.degree * reference
            _assert_scaled(_call(entry, c * matrix), expected, 1e-11 * condition)


def _extreme_entries() -> list:
    """For a weighting without a declared ``scale_degree``, the Gramian of the huge scales
    overflows: an expected ``ValueError`` (strict: the mark goes with the declaration); the tiny
    scales are not promised and not run for it."""
    params = []
    for entry in HOMOGENEOUS:
        marks = []
        if _undeclared(entry):
            reason = f"{entry.name}'s weighting declares no scale_degree (issue 16)"
            marks = [pytest.mark.xfail(strict=True, raises=ValueError, reason=reason)]
        params.append(pytest.param(entry, id=entry.name, marks=marks))
    return params


@pytest.mark.parametrize("entry", _extreme_entries())
def test_extreme_scales(entry: Entry) -> None:
    """Gradients of size 1e-30/1e30 (float32) or 1e-200/1e200 (float64) give the rescaled
    answer at scale 1: neither an under- or overflowing Gramian nor a threshold that depends on
    the scale changes the direction (issue 16, items 1 and 5)."""
    assert entry.degree is not None
    scales = [(d, s) for d, s in EXTREME_SCALES if s > 1.0 or not _undeclared(entry)]
    for matrix, condition in _families(entry):
        for dtype, scale in scales:
            reference = _call(entry, matrix.to(dtype)).double()
            scaled_output = _call(entry, (scale * matrix).to(dtype))
            assert scaled_output.dtype == dtype
            # Compared at scale 1: s^k would overflow float64 for s = 1e200 and k ≥ 2.
            rtol = RTOL[dtype] * condition
            _assert_scaled(scaled_output.double() / scale**entry.degree, reference, rtol)


@pytest.mark.parametrize("entry", [e for e in REGISTRY if e.degree is None], ids=lambda e: e.name)
def test_extreme_scales_without_homogeneity(entry: Entry) -> None:
    """Methods without a scaling law still give finite outputs, also on a second call."""
    for dtype, scale in EXTREME_SCALES:
        matrix = (scale * full_rank(4, 6, 230)).to(dtype)
        aggregator = entry.make(4)
        for _ in range(2):
            output = aggregator(matrix)
            assert output.dtype == dtype and torch.isfinite(output).all()
        if entry.name == "NashMTL":  # ‖d‖ ≤ max_norm = 1 whatever the scale
            assert float(output.double().norm()) <= 1.0 + 1e-5


@pytest.mark.parametrize(
    "entry",
    [e for e in GRAMIAN_BASED if e.make(3).weighting.scale_degree is not None],  # type: ignore[union-attr]
    ids=lambda e: e.name,
)
def test_weightings_follow_their_declared_scale_degree(entry: Entry) -> None:
    """``W(tG) = t^k W(G)`` for the declared ``k``, also for a Gramian near the bottom of its
    dtype's range (the engine's path: the Gramian is all the weighting sees). The scales keep
    the smallest entries of the scaled family's normalised Gramian (1e-12) normal numbers."""
    for matrix, condition in _families(entry):
        m = matrix.shape[0]
        gramian = matrix @ matrix.T
        gramian = gramian / gramian.abs().max()
        for dtype, scale in ((torch.float32, 1e-24), (torch.float64, 1e-280)):
            weighting = entry.make(m).weighting  # type: ignore[union-attr]
            reference = entry.make(m).weighting(gramian.to(dtype)).double() @ matrix  # type: ignore[union-attr]
            scaled = weighting((scale * gramian).to(dtype))
            assert scaled.dtype == dtype
            rtol = RTOL[dtype] * condition
            _assert_scaled(
                scaled.double() @ matrix / scale**weighting.scale_degree, reference, rtol
            )


# 8. Low precision ---------------------------------------------------------------------------

LOW_PRECISION = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # twice the unit roundoff


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_low_precision(entry: Entry) -> None:
    """float16/bfloat16 in, the same dtype out, computed in a safe precision: the output is the
    float64 answer for the same (rounded) input, up to the output's own rounding."""
    for matrix, _ in _families(entry)[:2]:  # unit-scale rows: within float16's range
        for dtype, roundoff in LOW_PRECISION.items():
            low = matrix.to(dtype)
            output = _call(entry, low)
            assert output.dtype == dtype
            expected = _call(entry, low.double())
            tolerance = roundoff * float(expected.abs().max()) + 1e-4 * float(low.abs().max())
            assert float((output.double() - expected).abs().max()) <= tolerance


@pytest.mark.parametrize("dtype", list(LOW_PRECISION), ids=str)
@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(
            entry,
            id=entry.name,
            marks=[
                pytest.mark.xfail(
                    strict=True,
                    reason=f"{entry.name}'s weighting is not @scale_free: its ridge uses the "
                    "input dtype's eps (issue 16)",
                )
            ]
            if _undeclared(entry)
            else [],
        )
        for entry in GRAMIAN_BASED
    ],
)
def test_low_precision_weightings(entry: Entry, dtype: torch.dtype) -> None:
    """The engine's path: a float16/bfloat16 Gramian gives weights in its dtype (no
    'not implemented for Half' from an eigendecomposition; issue 19, item 6)."""
    matrix = full_rank(5, 8, 231)
    gramian = (matrix @ matrix.T).to(dtype)
    weights = entry.make(5).weighting(gramian)  # type: ignore[union-attr]
    assert weights.dtype == dtype and torch.isfinite(weights).all()
    expected = entry.make(5).weighting(gramian.double())  # type: ignore[union-attr]
    tolerance = LOW_PRECISION[dtype] * float(expected.abs().max()) + 1e-4
    assert float((weights.double() - expected).abs().max()) <= tolerance


# 9. Non-conflict and permutation invariance in float32, on the degenerate families ----------

ALL_FAMILIES = MATRICES + [(name, x) for name, x in DEGENERATE if name not in dict(MATRICES)]
FLOAT32_RTOL = 2e-6  # a few float32 roundings of the result, relative to ‖J‖


@pytest.mark.parametrize(
    "entry", [e for e in REGISTRY if e.non_conflict == "always"], ids=lambda e: e.name
)
def test_non_conflict_float32(entry: Entry) -> None:
    """``J d ≥ 0`` up to float32 rounding, also on zero, identical, opposite and rank-one rows."""
    for name, matrix in ALL_FAMILIES:
        direction = _call(entry, matrix.float()).double()
        products = matrix @ direction
        tolerance = 1e-5 * matrix.norm(dim=1) * matrix.norm()
        assert (products >= -tolerance).all(), (name, products)


@pytest.mark.parametrize("entry", EQUIVARIANT, ids=lambda e: e.name)
def test_permutation_invariance_float32(entry: Entry) -> None:
    """``A(PJ) = A(J)`` to float32's level for the index-blind methods. Methods that solve a
    ridge-regularised system (Nash-MTL, FairGrad) on a rank-deficient Gramian (which has no
    exact solution) put weights of size ``1/ridge`` on null directions, which float32 does not
    cancel: they are held to ``5e-3`` there (measured: up to ``5e-4``)."""
    for name, matrix in ALL_FAMILIES:
        m = matrix.shape[0]
        if m < entry.min_rows:
            continue
        permutation = torch.randperm(m, generator=torch.Generator().manual_seed(m + 1))
        single = matrix.float()
        expected = _call(entry, single).double()
        actual = _call(entry, single[permutation]).double()
        singular_values = torch.linalg.svdvals(matrix)
        independent = m <= matrix.shape[1] and bool(singular_values[-1] > 1e-3 * singular_values[0])
        loose = entry.name in ("NashMTL", "NashMTL-unclipped", "FairGrad") and not independent
        rtol = 5e-3 if loose else FLOAT32_RTOL
        assert float((actual - expected).norm()) <= rtol * float(matrix.norm()), name


# 10. Stationarity ---------------------------------------------------------------------------

STRONGLY = [
    ("strong_5x4", strongly_stationary(5, 4, 3, 1)),
    ("strong_7x9", strongly_stationary(7, 9, 4, 2)),
]
WEAKLY_ONLY = [
    ("weak_5x7", weakly_not_strongly_stationary(5, 7, 3)),
    ("weak_4x3", weakly_not_strongly_stationary(4, 3, 4)),
]
NOT_WEAKLY = [
    ("not_weak_5x3", not_weakly_stationary(5, 3, 2, 5)),
    ("not_weak_4x6", not_weakly_stationary(4, 6, 3, 6)),
]


def _stationarity_cases(kind: Stationarity, families: list[tuple[str, Tensor]]) -> list:
    return [
        pytest.param(entry, matrix.to(dtype), id=f"{entry.name}-{name}-{str(dtype)[6:]}")
        for entry in REGISTRY
        if entry.stationarity == kind
        for name, matrix in families
        for dtype in (torch.float32, torch.float64)
    ]


@pytest.mark.parametrize(
    ("entry", "matrix"),
    _stationarity_cases("strong", WEAKLY_ONLY + NOT_WEAKLY)
    + _stationarity_cases("weak", NOT_WEAKLY),
)
def test_nonzero_away_from_stationarity(entry: Entry, matrix: Tensor) -> None:
    """Strong stationarity (``A(J) = 0 ⇒ Jᵀw = 0`` for some ``w > 0``), tested by its
    contrapositive: on a matrix without such a ``w``, ``A(J) ≠ 0``; for MGDA the same on
    matrices without a non-negative ``w``."""
    norm = float(_call(entry, matrix).double().norm())
    assert norm > 1e-2 * float(matrix.double().norm())


@pytest.mark.parametrize(
    ("entry", "matrix"),
    [
        pytest.param(entry, matrix.to(dtype), id=f"MGDA-{name}-{str(dtype)[6:]}")
        for entry in REGISTRY
        if entry.stationarity == "weak"
        for name, matrix in STRONGLY + WEAKLY_ONLY
        for dtype in (torch.float32, torch.float64)
    ],
)
def test_zero_at_weak_stationarity(entry: Entry, matrix: Tensor) -> None:
    """MGDA: ``d = 0`` (to rounding) when ``0`` is in the convex hull of the rows."""
    tolerance = 1e3 * torch.finfo(matrix.dtype).eps + 1e-9  # rounding + the QP's ridge (1e-10)
    norm = float(_call(entry, matrix).double().norm())
    assert norm <= tolerance * float(matrix.double().norm())


@pytest.mark.parametrize(
    ("entry", "matrix"),
    [
        pytest.param(entry, matrix.to(dtype), id=f"{entry.name}-{name}-{str(dtype)[6:]}")
        for entry in REGISTRY
        if entry.name in ("UPGrad", "DualProj")
        for name, matrix in STRONGLY
        for dtype in (torch.float32, torch.float64)
    ],
)
def test_dual_cone_methods_vanish_at_strong_stationarity(entry: Entry, matrix: Tensor) -> None:
    """The dual cone of a strongly stationary ``J`` is ``{x : Jx = 0}``, on which every
    row projects to ``0``: UPGrad and DualProj return ``0`` (to rounding)."""
    tolerance = 1e3 * torch.finfo(matrix.dtype).eps + 1e-9  # rounding + the QP's ridge (1e-10)
    norm = float(_call(entry, matrix).double().norm())
    assert norm <= tolerance * float(matrix.double().norm())


# 11. Continuity at degenerate inputs --------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "matrix"),
    [
        pytest.param(entry, matrix, id=f"{entry.name}-{name}")
        for entry in REGISTRY
        if entry.continuous
        for name, matrix in DEGENERATE
        if matrix.shape[0] >= entry.min_rows
    ],
)
def test_continuity_at_degenerate_inputs(entry: Entry, matrix: Tensor) -> None:
    """``A(J + δE) → A(J)`` as ``δ → 0`` where ``J`` has zero, identical or opposite rows, rank
    one, one row or one column: at ``δ = 1e-10`` (float64) the change is at most
    ``1e-4 ‖J‖`` (allowing a Hölder-½ modulus, as projections onto cones that change shape
    have)."""
    perturbation = torch.randn(matrix.shape, generator=torch.Generator().manual_seed(7))
    expected = _call(entry, matrix)
    actual = _call(entry, matrix + 1e-10 * perturbation.double())
    assert float((actual - expected).norm()) <= 1e-4 * float(matrix.norm())


# 12. TorchJD 0.18 as an outside oracle ------------------------------------------------------

#: Methods whose TorchJD implementation follows the same definition, and the families where
#: it is exact. Left out: UPGrad/DualProj (TorchJD needs qpsolvers; cvxpy and quadprog oracles
#: are in their own tests), MGDA (TorchJD's Frank–Wolfe stops at 1e-3), Krum (TorchJD's
#: Multi-Krum picks other rows than the lowest scores of the paper on rank2_6x9), and IMTL-G on
#: inconsistent systems (``1 ∉ range(N)``: TorchJD takes the least-squares ``w`` of ``Gw ∝ s``,
#: jdoptim that of ``N(Sw) ∝ 1``; both are extensions of the paper's invertible case).
_CONSISTENT = (
    "full_rank_3x10",
    "full_rank_5x5",
    "single_1x7",
    "zero_row_4x6",
    "duplicated_4x6",
    "scaled_5x8",
    "identical_4x5",
)
TORCHJD_ORACLE = {
    "ConFIG": ("ConFIG", None),
    "AlignedMTL": ("AlignedMTL", None),
    "IMTLG": ("IMTLG", _CONSISTENT),
    "TrimmedMean": ("TrimmedMean", None),
    "Mean": ("Mean", None),
    "Sum": ("Sum", None),
}


@pytest.mark.parametrize(
    "entry", [e for e in REGISTRY if e.name in TORCHJD_ORACLE], ids=lambda e: e.name
)
def test_against_torchjd(entry: Entry) -> None:
    torchjd_aggregation = pytest.importorskip("torchjd.aggregation")
    class_name, families = TORCHJD_ORACLE[entry.name]
    make_oracle = getattr(torchjd_aggregation, class_name)
    for name, matrix in ALL_FAMILIES:
        if matrix.shape[0] < entry.min_rows or (families is not None and name not in families):
            continue
        oracle = make_oracle(1) if entry.name == "TrimmedMean" else make_oracle()
        expected = oracle(matrix)
        actual = _call(entry, matrix)
        assert float((actual - expected).norm()) <= 1e-10 * float(matrix.norm()), name


# 13. Rounding noise of float32 Gramians over many parameters --------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_pseudo_inverse_methods_ignore_float32_gramian_noise(seed: int) -> None:
    """A rank-3 Jacobian of 6 rows over 5·10⁵ parameters in float32: its Gramian's null
    directions carry rounding noise of about 1e-5 λ_max (which a weighting cannot predict from
    ``n``); ConFIG, IMTL-G and Aligned-MTL must cut it, not invert it (the float64 answer of the
    same rank-3 matrix). A cut-off of m·ε on the cosine matrix gave a relative error of 1e13."""
    matrix = full_rank(6, 3, 55 + seed) @ full_rank(3, 500_000, 56 + seed)
    for aggregator in (agg.ConFIG(), agg.IMTLG(), agg.AlignedMTL()):
        expected = aggregator(matrix)
        actual = aggregator(matrix.float()).double()
        assert float((actual - expected).norm()) <= 1e-3 * float(expected.norm()), aggregator


@pytest.mark.parametrize("name", ["ConFIG", "IMTLG", "AlignedMTL"])
def test_negative_eigenvalues_reveal_the_noise_to_cut(name: str) -> None:
    """A rank-3 Gramian whose null space carries noise of eigenvalues (+η, −η, −η), η = 1e-6
    relative, far above float64's cut-offs: the negative ones show the noise level, so the
    positive one is cut as well (inverting it gave an arbitrary direction). The weights of the
    noisy Gramian give the update of the exact one."""
    matrix = full_rank(6, 3, 240) @ full_rank(3, 9, 241)
    gramian = matrix @ matrix.T
    eigenvalues, eigenvectors = torch.linalg.eigh(gramian)
    null = eigenvectors[:, :3]  # the three (numerically) zero eigenvalues come first
    noise = 1e-6 * float(eigenvalues.max()) * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)
    noisy = gramian + null @ torch.diag(noise) @ null.T
    weighting = getattr(agg, f"{name}Weighting")()
    expected = weighting(gramian) @ matrix
    actual = weighting(noisy) @ matrix
    assert float((actual - expected).norm()) <= 1e-4 * float(expected.norm())
