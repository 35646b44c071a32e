"""Timing of the Gramian-only weightings of part B (conflict surgery and robust methods).

Each weighting is timed on the ``m × m`` Gramian of a random float32 Jacobian, for
``m ∈ {2, 8, 32, 64, 128}``, beside a reference operation timed in the same run
(``torch.linalg.eigh`` of the same Gramian), because absolute times are noise on shared machines.

Run: ``python -m pytest benchmarks/test_bench_weightings_surgery.py --benchmark-only -q``.

The timings use one intra-op thread (restored afterwards): the weightings' operations are on
``m × m`` matrices, far too small to gain from intra-op parallelism, and with two threads on a
machine that other processes load, the thread pool's synchronisation dominated and made timings
jump by 100× between identical calls (e.g. PCGrad at ``m = 64``: 2.4 ms with one thread, 10–700 ms
with two).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from jdoptim.aggregation import (
    ConFIGWeighting,
    GradVacWeighting,
    KrumWeighting,
    PCGradWeighting,
    RandomWeighting,
)

SIZES = [2, 8, 32, 64, 128]
N_PARAMETERS = 512


def _eigh(gramian: Tensor) -> Tensor:
    return torch.linalg.eigh(gramian).eigenvalues


METHODS: dict[str, Callable[[int], Callable[[Tensor], Tensor]]] = {
    "eigh (reference)": lambda m: _eigh,
    "PCGrad": lambda m: PCGradWeighting(seed=0),
    "PCGrad fixed": lambda m: PCGradWeighting(order="fixed"),
    "GradVac": lambda m: GradVacWeighting(seed=0),
    "ConFIG": lambda m: ConFIGWeighting(),
    "Krum": lambda m: KrumWeighting(n_byzantine=max(0, (m - 3) // 2), n_selected=1),
    "Random": lambda m: RandomWeighting(seed=0),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


CASES = [(method, m) for method in METHODS for m in SIZES if not (method == "Krum" and m < 3)]


@pytest.mark.benchmark(group="weightings-b", min_rounds=5, max_time=0.3, warmup=True)
@pytest.mark.parametrize(("method", "m"), CASES)
def test_weighting(benchmark, method: str, m: int) -> None:
    generator = torch.Generator().manual_seed(m)
    jacobian = torch.randn(m, N_PARAMETERS, generator=generator)
    gramian = jacobian @ jacobian.T
    weighting = METHODS[method](m)
    benchmark.extra_info.update({"method": method, "m": m})
    weights = benchmark(weighting, gramian)
    assert weights.shape == (m,) and torch.isfinite(weights).all()
