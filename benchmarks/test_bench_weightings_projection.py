"""Timings of the projection and balancing weightings (part A) on Gramians of sampled Jacobians.

Run: ``python -m pytest benchmarks/test_bench_weightings_projection.py --benchmark-only -q``.
Absolute times are noise on a shared machine: compare them with the reference operations timed
in the same run (``J @ J.T`` for n = 10 000 and ``torch.linalg.eigh`` of the m×m Gramian).
"""

from __future__ import annotations

import pytest
import torch

from jdoptim.aggregation import (
    AlignedMTLWeighting,
    CAGradWeighting,
    DualProjWeighting,
    FairGradWeighting,
    IMTLGWeighting,
    MGDAWeighting,
    NashMTLWeighting,
    UPGradWeighting,
)

SIZES = [2, 8, 32, 64, 128]
N = 10_000

FACTORIES = {
    "UPGrad": UPGradWeighting,
    "DualProj": DualProjWeighting,
    "MGDA": MGDAWeighting,
    "IMTLG": IMTLGWeighting,
    "AlignedMTL": AlignedMTLWeighting,
    "CAGrad": CAGradWeighting,
    "NashMTL": NashMTLWeighting,  # a fresh instance per call: no warm start from a cache
    "FairGrad": FairGradWeighting,
}


def _jacobian(m: int) -> torch.Tensor:
    return torch.randn(m, N, generator=torch.Generator().manual_seed(m))


def _gramian(m: int) -> torch.Tensor:
    j = _jacobian(m)
    return j @ j.T


def _rounds(m: int) -> int:
    return 30 if m <= 32 else 10


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("name", list(FACTORIES))
def test_weighting(benchmark, name, m):
    gramian = _gramian(m)
    factory = FACTORIES[name]
    benchmark.group = f"m={m}"
    benchmark.pedantic(
        lambda w: w(gramian),
        setup=lambda: ((factory(),), {}),
        rounds=_rounds(m),
        warmup_rounds=1,
    )


@pytest.mark.parametrize("m", SIZES)
def test_reference_gramian_matmul(benchmark, m):
    j = _jacobian(m)
    benchmark.group = f"m={m}"
    benchmark.pedantic(lambda: j @ j.T, rounds=_rounds(m), warmup_rounds=1)


@pytest.mark.parametrize("m", SIZES)
def test_reference_eigh(benchmark, m):
    gramian = _gramian(m).double()
    benchmark.group = f"m={m}"
    benchmark.pedantic(lambda: torch.linalg.eigh(gramian), rounds=_rounds(m), warmup_rounds=1)
