"""(Multi-)Krum (Blanchard et al., 2017) against a naive loop on explicit distances."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import Krum, KrumWeighting

from .matrices import full_rank


def naive_krum(matrix: Tensor, f: int, n_selected: int) -> Tensor:
    m = matrix.shape[0]
    scores = []
    for i in range(m):
        distances = sorted(
            float((matrix[i] - matrix[j]).square().sum()) for j in range(m) if j != i
        )
        scores.append(sum(distances[: m - f - 2]))
    chosen = sorted(range(m), key=lambda i: (scores[i], i))[:n_selected]
    return matrix[chosen].mean(dim=0)


@pytest.mark.parametrize(("f", "n_selected"), [(0, 1), (1, 1), (1, 3), (2, 2), (3, 5)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_naive_loop(f: int, n_selected: int, seed: int) -> None:
    matrix = full_rank(8, 5, 70 + seed)
    torch.testing.assert_close(Krum(f, n_selected)(matrix), naive_krum(matrix, f, n_selected))


def test_rejects_byzantine_outliers() -> None:
    honest = torch.ones(5, 4, dtype=torch.float64) + 0.01 * full_rank(5, 4, 71)
    matrix = torch.cat([honest, torch.full((2, 4), 1e3, dtype=torch.float64)])
    weights = KrumWeighting(n_byzantine=2, n_selected=3)(matrix @ matrix.T)
    assert (weights[5:] == 0).all()
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert ((weights[:5] == 0) | (weights[:5] == 1 / 3)).all()


def test_non_differentiable() -> None:
    matrix = full_rank(5, 3).requires_grad_()
    assert Krum(1)(matrix).grad_fn is None


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="at least 5"):
        Krum(2)(full_rank(4, 3))
    with pytest.raises(ValueError, match="n_selected"):
        Krum(0, 5)(full_rank(4, 3))
    for kwargs in [{"n_byzantine": -1}, {"n_byzantine": 1, "n_selected": 0}, {"n_byzantine": 1.0}]:
        with pytest.raises(ValueError):
            Krum(**kwargs)
