"""PCGrad against a naive loop re-derivation of Algorithm 1 of Yu et al. (2020) on J."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import PCGrad, PCGradWeighting

from .matrices import MATRIX_IDS, MATRIX_VALUES, full_rank


def naive_pcgrad(matrix: Tensor, orders: list[list[int]], reduction: str = "sum") -> Tensor:
    """Project each row on the original rows it conflicts with, in the given orders."""
    m = matrix.shape[0]
    projected = []
    for i in range(m):
        g = matrix[i].clone()
        for j in orders[i]:
            if j == i:
                continue
            dot = g @ matrix[j]
            squared_norm = matrix[j] @ matrix[j]
            if dot < 0 and squared_norm > 0:
                g = g - dot / squared_norm * matrix[j]
        projected.append(g)
    total = torch.stack(projected).sum(dim=0)
    return total / m if reduction == "mean" else total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("matrix", MATRIX_VALUES, ids=MATRIX_IDS)
def test_fixed_order_matches_naive_loop(matrix: Tensor, reduction: str) -> None:
    m = matrix.shape[0]
    expected = naive_pcgrad(matrix, [list(range(m))] * m, reduction)
    actual = PCGrad(reduction=reduction, order="fixed")(matrix)
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * matrix.abs().max())


def test_two_conflicting_gradients_closed_form() -> None:
    # g1 = (1, 0), g2 = (-1, 1): g1' = g1 + g2/2 = (1/2, 1/2), g2' = g2 + g1 = (0, 1).
    matrix = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(
        PCGrad(seed=0)(matrix), torch.tensor([0.5, 1.5], dtype=torch.float64)
    )
    torch.testing.assert_close(
        PCGrad("mean", seed=0)(matrix), torch.tensor([0.25, 0.75], dtype=torch.float64)
    )


def test_no_conflict_gives_the_sum() -> None:
    matrix = torch.rand(4, 6, dtype=torch.float64)  # positive entries: no pair conflicts
    torch.testing.assert_close(PCGrad(seed=1)(matrix), matrix.sum(dim=0))


def test_random_order_matches_one_of_the_orders_and_varies() -> None:
    matrix = full_rank(3, 3, seed=11)
    others = [[j for j in range(3) if j != i] for i in range(3)]
    combos = list(itertools.product(*[list(itertools.permutations(o)) for o in others]))
    candidates = [naive_pcgrad(matrix, [list(c) for c in combo]) for combo in combos]
    # The order must matter for this matrix, or the test could not tell orders apart.
    distinct = {tuple(round(x, 9) for x in c.tolist()) for c in candidates}
    assert len(distinct) > 1
    aggregator = PCGrad(seed=3)
    seen = set()
    for _ in range(30):
        output = aggregator(matrix)
        matches = [k for k, c in enumerate(candidates) if torch.allclose(output, c, atol=1e-10)]
        assert matches, "output is not PCGrad under any order"
        seen.add(tuple(round(x, 9) for x in output.tolist()))
    assert len(seen) > 1, "the random order never changed"


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_two_tasks_never_conflict(seed: int) -> None:
    # Yu et al. (2020), Theorem 1 setting: with two tasks, ⟨d, g_i⟩ = ⟨g_i', g_i⟩ ≥ 0.
    matrix = full_rank(2, 5, seed=100 + seed)
    direction = PCGrad(seed=seed)(matrix)
    assert (matrix @ direction >= -1e-12).all()


def _trajectory(aggregator: PCGrad, matrix: Tensor, steps: int) -> list[Tensor]:
    return [aggregator(matrix) for _ in range(steps)]


def test_seed_reproducibility_reset_and_state_dict_round_trip() -> None:
    matrix = full_rank(3, 3, seed=11)  # a matrix whose PCGrad depends on the order
    first = _trajectory(PCGrad(seed=42), matrix, 4)
    second = _trajectory(PCGrad(generator=torch.Generator().manual_seed(42)), matrix, 4)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(not torch.equal(first[0], x) for x in first[1:])

    aggregator = PCGrad(seed=42)
    _trajectory(aggregator, matrix, 2)
    state = aggregator.state_dict()
    expected = _trajectory(aggregator, matrix, 2)
    restored = PCGrad(seed=7)
    restored.load_state_dict(state)
    for a, b in zip(_trajectory(restored, matrix, 2), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    aggregator.reset()
    for a, b in zip(_trajectory(aggregator, matrix, 4), first, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_global_seed_makes_default_instances_reproducible() -> None:
    matrix = full_rank(4, 5, seed=13)
    torch.manual_seed(123)
    a = _trajectory(PCGrad(), matrix, 3)
    torch.manual_seed(123)
    b = _trajectory(PCGrad(), matrix, 3)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_weighting_is_non_differentiable_and_matches_aggregator() -> None:
    matrix = full_rank(4, 6, seed=14).requires_grad_()
    weights = PCGradWeighting(order="fixed")(matrix @ matrix.T)
    assert weights.grad_fn is None
    torch.testing.assert_close(weights @ matrix.detach(), PCGrad(order="fixed")(matrix))


@pytest.mark.parametrize(
    "kwargs",
    [{"reduction": "avg"}, {"order": "sorted"}, {"seed": 1, "generator": torch.Generator()}],
)
def test_bad_hyperparameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        PCGrad(**kwargs)


def test_bad_seed_type() -> None:
    with pytest.raises(TypeError):
        PCGrad(seed=1.5)  # type: ignore[arg-type]
