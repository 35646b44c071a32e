"""UPGrad, DualProj and MGDA weightings on the Gramian family, m = 64 … 1024, in dense inverses.

For every Gramian of :mod:`benchmarks.gramian_family` and every ``m``, each method is timed
alternately with its calibration, one dense ``m × m`` inverse of the same Gramian (float64,
``torch.linalg.inv``), in the same run, and reported as the median of the per-round ratios
(``time(method) / time(inverse)``): absolute times drift with the machine's load, ratios much
less. The median absolute time is printed too. For each (family, method) the growth exponent is
the least-squares slope of ``log time`` against ``log m``. TorchJD 0.18's ``UPGradWeighting`` is
timed beside jdoptim's up to ``--torchjd-up-to`` (default 256; a call over 60 s stops it).

Run (on a quiet machine; a full table takes several minutes)::

    PYTHONPATH=$PWD python benchmarks/bench_weightings_scale.py
    PYTHONPATH=$PWD python benchmarks/bench_weightings_scale.py --sizes 64 128 --families random

The first run generates the real-model Gramians (about two minutes) and caches them under
``benchmarks/.gramian_cache``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gramian_family import FAMILIES, gramian
from jdoptim.aggregation import DualProjWeighting, MGDAWeighting, UPGradWeighting

SIZES = [64, 128, 256, 512, 1024]
_TORCHJD_GIVE_UP_S = 60.0


def _torchjd_upgrad() -> Callable[[Tensor], Tensor] | None:
    try:  # TorchJD's default projector needs qpsolvers (``torchjd[quadprog_projector]``)
        from torchjd.aggregation import UPGradWeighting as TorchJDUPGrad

        return TorchJDUPGrad()
    except ImportError:
        return None


METHODS: dict[str, Callable[[], Callable[[Tensor], Tensor] | None]] = {
    "UPGrad": UPGradWeighting,
    "TorchJD UPGrad": _torchjd_upgrad,
    "DualProj": DualProjWeighting,
    "MGDA": MGDAWeighting,
}


def in_inverses(method: Callable[[Tensor], Tensor], g: Tensor, rounds: int) -> dict[str, float]:
    """Median over ``rounds`` of ``time(method(g)) / time(inv(g))``, timed alternately
    (``inv_ex``: the same LU-based inverse, which does not raise on the exactly singular Gramian
    of duplicated samples)."""
    wide = g.double()
    method(g)  # warm-up (and the first call's lazy imports)
    torch.linalg.inv_ex(wide)
    ratios, times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        torch.linalg.inv_ex(wide)
        middle = time.perf_counter()
        method(g)
        end = time.perf_counter()
        ratios.append((end - middle) / (middle - start))
        times.append(end - middle)
    return {"inverses": statistics.median(ratios), "ms": statistics.median(times) * 1e3}


def growth_exponent(sizes: list[int], times_ms: list[float]) -> float:
    """Least-squares slope of ``log t`` against ``log m``."""
    if len(sizes) < 2:
        return math.nan
    xs = [math.log(m) for m in sizes]
    ys = [math.log(t) for t in times_ms]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )


def _rounds(m: int, base: int) -> int:
    return max(3, base if m <= 128 else base // (m // 128))


def run(
    families: list[str], sizes: list[int], methods: list[str], torchjd_up_to: int, rounds: int
) -> list[str]:
    """Measure every (family, method, m) and return the markdown table's lines."""
    lines = [
        "| family | method | " + " | ".join(f"m = {m}" for m in sizes) + " | growth exponent |",
        "|---|---|" + "---|" * (len(sizes) + 1),
    ]
    for family in families:
        for name in methods:
            cells, measured = [], []
            method = METHODS[name]()
            for m in sizes:
                if method is None or (name.startswith("TorchJD") and m > torchjd_up_to):
                    cells.append("–")
                    continue
                result = in_inverses(method, gramian(family, m), _rounds(m, rounds))
                cells.append(f"{result['inverses']:.1f} ({result['ms']:.3g} ms)")
                measured.append((m, result["ms"]))
                if name.startswith("TorchJD") and result["ms"] > 1e3 * _TORCHJD_GIVE_UP_S:
                    method = None
            exponent = growth_exponent([m for m, _ in measured], [t for _, t in measured])
            lines.append(f"| {family} | {name} | " + " | ".join(cells) + f" | {exponent:.2f} |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, choices=FAMILIES)
    parser.add_argument("--sizes", nargs="+", type=int, default=SIZES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--torchjd-up-to", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=10, help="rounds at m <= 128")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; cells: dense inverses (median ms)")
    lines = run(args.families, args.sizes, args.methods, args.torchjd_up_to, args.rounds)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
