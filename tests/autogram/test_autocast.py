"""The engine under bf16 autocast: the Gramian is accumulated in float32, not in bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jdoptim.autogram import Engine

from ._oracle import explicit_gramian


def test_gramian_under_bf16_autocast_is_float32_and_matches_the_explicit_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.LayerNorm(128))
    x = torch.randn(32, 64)
    with Engine(model, batch_dim=0) as engine:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float().pow(2).mean(dim=1)
        gramian = engine.compute_gramian(out)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = model(x).float().pow(2).mean(dim=1)
        # Oracle: the same bf16 graph, one autograd.grad per sample, J Jᵀ in float64.
        expected = explicit_gramian(again, list(model.parameters()))
    assert gramian.dtype == torch.float32
    scale = expected.diagonal().max()
    # bf16 activations and gradients carry ~3 significant digits; the float32 contraction must
    # not add its own rounding of the same order on top (half-precision sums did: ~1e-2).
    assert (gramian.double() - expected).abs().max() <= 2e-3 * scale
    # Accumulated in float32 the Gramian stays positive semi-definite to rounding.
    assert torch.linalg.eigvalsh(gramian.double()).min() >= -1e-5 * scale


class _FreeParameter(torch.nn.Module):
    """Direct parameters only (no child with parameters): the generic rule re-runs it (under
    the recorded autocast region)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(32, 64) * 0.2)
        self.head_weight = torch.nn.Parameter(torch.randn(16, 64) * 0.1)
        self.head_bias = torch.nn.Parameter(torch.zeros(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.tanh(x @ self.weight), self.head_weight, self.head_bias)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_re_run_under_autocast_replays_the_region(batch_dim: int | None) -> None:
    """A module the generic rule re-runs, called under bf16 autocast: the re-run computes in
    the same region, so its rows are the bf16 graph's (relative error 7e-4 per-sample and 2e-3
    for task losses when the re-run ran in float32; now below 1e-5)."""
    torch.manual_seed(0)
    model = _FreeParameter()
    x = torch.randn(16, 32)
    with Engine(model, batch_dim=batch_dim) as engine:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x).float().pow(2)
        losses = out.sum(1) if batch_dim == 0 else out.mean(0)
        expected = explicit_gramian(losses, list(model.parameters()))
        gramian = engine.compute_gramian(losses)
    error = (gramian.double() - expected).abs().max() / expected.abs().max()
    assert error < 1e-5, f"relative error {error:.3g}"
