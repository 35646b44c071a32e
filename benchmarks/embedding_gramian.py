"""An embedding's per-sample Gramian: the index kernel over every pair of positions against the
pairs of positions that read the same row (:mod:`jdoptim.autogram.rules._index_pairs`).

For ``b`` samples of ``S`` tokens from ``V`` rows (``e = 32``, ``T = 1``, float32), both
methods on the same output gradients: the fastest of 5 calls each, their agreement (float64,
relative), and the pairs counted. Run: ``PYTHONPATH=$PWD python benchmarks/embedding_gramian.py``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from jdoptim.autogram.rules._contraction import gramian_from_kernel
from jdoptim.autogram.rules._index_pairs import _pair_count, index_pairs_gramian

CASES = [(32, 16, 512), (64, 16, 512), (128, 16, 512), (256, 16, 512), (256, 16, 50257),
         (256, 16, 16), (1024, 16, 50257)]  # fmt: skip


def kernel_gramian(index: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """The index kernel ``[idx_is = idx_jr]`` over all ``(bS)²`` pairs, contracted."""
    flat = index.reshape(-1)
    kernel = (flat[:, None] == flat[None, :]).to(grads.dtype)
    b, s = index.shape
    return gramian_from_kernel(kernel.view(b, s, b, s), grads)


def fastest(
    f: Callable[[torch.Tensor, torch.Tensor], object],
    index: torch.Tensor,
    grads: torch.Tensor,
    count: int = 5,
) -> float:
    """The fastest of ``count`` calls of ``f(index, grads)``, in ms."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        f(index, grads)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def main() -> None:
    torch.set_num_threads(2)
    print("| b | S | V | pairs (Σ c²) | (bS)² | kernel (ms) | pairs (ms) | agreement |")
    print("|---|---|---|---|---|---|---|---|")
    for b, s, rows in CASES:
        torch.manual_seed(0)
        index = torch.randint(0, rows, (b, s))
        grads = torch.randn(1, b, s, 32, dtype=torch.float64)
        if b * s <= 4096:
            exact = kernel_gramian(index, grads)
            error = (index_pairs_gramian(index, grads) - exact).abs().max() / exact.abs().max()
            agreement = f"{error:.1e}"
            kernel_ms = f"{fastest(kernel_gramian, index, grads.float()):.2f}"
        else:
            agreement, kernel_ms = "–", "– (a (bS)² kernel of 1 GB)"
        pairs_ms = fastest(index_pairs_gramian, index, grads.float())
        pairs = _pair_count(index)
        print(f"| {b} | {s} | {rows} | {pairs} | {(b * s) ** 2} | {kernel_ms} | {pairs_ms:.2f} "
              f"| {agreement} |")  # fmt: skip


if __name__ == "__main__":
    main()
