"""Per-sample JD on a sequence-first model (``[s, b, d]`` activations, ``batch_first=False``
attention): ``batch_dim=1`` with a vector of per-sample losses ``[b]``, exact against the
explicit Jacobian of the same losses (same forward, same dropout masks)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine


def _explicit_jacobian(losses: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                    for p, g in zip(params, grads)
                ]
            )
        )
    return torch.stack(rows)


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_sequence_first_encoder_layer_per_sample_losses(dropout: float, low_memory: bool) -> None:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, dtype=torch.float64)
    head = nn.Linear(16, 1, dtype=torch.float64)
    model = nn.ModuleDict({"layer": layer, "head": head}).train()
    params = list(model.parameters())
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.0),
        UPGrad(),
        modules=model,
        batch_dim=1,
        low_memory=low_memory,
    )
    x = torch.randn(5, 4, 16, dtype=torch.float64)  # [s, b, d]
    for _ in range(2):  # the first step certifies the route, the second takes it
        opt.zero_grad()
        losses = head(layer(x)).squeeze(-1).pow(2).mean(0)  # [b]
        jacobian = _explicit_jacobian(losses, params)
        record = opt.step(losses)
        expected_gramian = jacobian @ jacobian.T
        torch.testing.assert_close(record.gramian, expected_gramian, rtol=1e-9, atol=1e-12)
        expected = UPGrad()(jacobian)
        got = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-10)
    assert record.weights.shape == (4,)


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_engine_called_directly_takes_per_sample_vector_at_batch_dim_1(
    dropout: float, low_memory: bool
) -> None:
    """``Engine.compute_gramian`` on a ``[b]`` vector of per-sample losses of a sequence-first
    model gives their ``[b, b]`` Gramian (it used to refuse them: "batch_dim=1 but the losses
    have shape (4,)"), equal to the explicit Jacobian's on the same forward."""
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, dtype=torch.float64)
    head = nn.Linear(16, 1, dtype=torch.float64)
    model = nn.ModuleDict({"layer": layer, "head": head}).train()
    params = list(model.parameters())
    engine = Engine(model, batch_dim=1, low_memory=low_memory)
    x = torch.randn(5, 4, 16, dtype=torch.float64)  # [s, b, d]
    for _ in range(2):  # the first call certifies the route, the second takes it
        losses = head(layer(x)).squeeze(-1).pow(2).mean(0)  # [b]
        jacobian = _explicit_jacobian(losses, params)
        gramian = engine.compute_gramian(losses)
        assert gramian.shape == (4, 4)
        torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)


class _TimeMajorAttention(nn.Module):
    """``nn.MultiheadAttention`` as constructed by default (``batch_first=False``, ``[L, b, E]``)
    with its attention weights returned (``need_weights=True``: ``[b, L, S]``, samples first);
    the loss uses them when ``use_weights``."""

    def __init__(self, use_weights: bool, average: bool) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, dtype=torch.float64)
        self.head = nn.Linear(6, 1, dtype=torch.float64)
        self.use_weights, self.average = use_weights, average

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [L, b, E] → [b]
        out, weights = self.attention(x, x, x, average_attn_weights=self.average)
        losses = self.head(torch.tanh(out)).squeeze(-1).pow(2).mean(0)
        if self.use_weights:  # [b, L, S] or [b, heads, L, S]
            losses = losses + weights.pow(2).flatten(1).sum(1)
        return losses


@pytest.mark.parametrize("average", [True, False], ids=["averaged", "per-head"])
@pytest.mark.parametrize("use_weights", [False, True], ids=["output", "output+weights"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
def test_time_major_attention_weights_hold_the_samples_first(
    use_weights: bool, average: bool, low_memory: bool
) -> None:
    """The attention weights of a time-major ``MultiheadAttention`` hold the samples along 0
    while its output holds them along 1: per-sample steps at ``batch_dim=1`` stay on the fast
    path (no ``EngineRouteWarning``, an error in this suite; it used to take one backward row
    per loss), exact, also when the losses use the weights."""
    torch.manual_seed(0)
    model = _TimeMajorAttention(use_weights, average)
    params = list(model.parameters())
    x = torch.randn(5, 3, 6, dtype=torch.float64)  # [L, b, E]
    with Engine(model, batch_dim=1, low_memory=low_memory) as engine:
        for _ in range(2):
            losses = model(x)
            jacobian = _explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=True)
            with torch.no_grad():
                gramian = step.gramian()
            if low_memory:
                step.release_graph(losses)
            assert step.b == 3
            torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-10, atol=1e-12)
