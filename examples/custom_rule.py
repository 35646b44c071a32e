"""A Gramian rule for your own layer type.

The Gramian engine (``JDOptimizer(..., modules=model)``) differentiates each layer with a rule.
Layers without one go through a generic ``torch.func`` rule: exact, but it re-runs the layer and
forms one gradient row per loss. A rule of your own makes such a layer as cheap as a built-in one:

* a layer that applies a weight matrix to the last dimension of its input subclasses
  ``LinearLikeRule`` and states how the weight is stored (``"out_in"`` as ``nn.Linear``,
  ``"in_out"`` as below), in three lines; its Gramian factorisation (a ``KernelTerm`` of the
  inputs and the output gradients) comes from the base, so the distributed engine exchanges
  those small factors for it too;
* any other layer subclasses ``LayerRule`` and gives the rows ``∂ℓ_{ik}/∂p`` (``jacobians``) and
  the weighted gradient ``Σ w_{ik} ∂ℓ_{ik}/∂p`` (``weighted``) from the call's recorded input
  (``call.args``) and its output gradients ``D`` (``call.grad``); the Gramian then comes from
  the rows (the default ``factorisation``, one ``RowsTerm`` per parameter), or from a
  ``factorisation`` of its own (``KernelTerm``, ``IndexTerm``) where the layer is linear in its
  weight.

Register a rule with ``@register_rule(LayerClass)``, or with the class's qualified name
(``"package.module.ClassName"``) for a layer of a package you do not want to import. Everything
used here is public in ``jdoptim.autogram.rules`` (its docstring states the contract).

Run: ``python examples/custom_rule.py``
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine
from jdoptim.autogram.rules import LayerRule, LinearLikeRule, register_rule, registered_rule


class Projection(nn.Module):
    """``Y = X K``: a linear layer whose weight ``kernel`` is stored ``[in, out]``."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(d_in, d_out) / d_in**0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.kernel


class ChannelScale(nn.Module):
    """``Y = X ⊙ γ``, a learned scale per channel (the last dimension)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


@register_rule(Projection)
class ProjectionRule(LinearLikeRule):
    weight_layout = "in_out"
    weight_name = "kernel"  # (no bias: the rule finds none under "bias")


@register_rule(ChannelScale)
class ChannelScaleRule(LayerRule):
    r"""``∂ℓ_{ik}/∂γ = Σ_s D[k]_{is} ⊙ X_{is}``: sums over every position ``s`` of sample ``i``."""

    def _per_sample(self, tensor: Tensor, leading: int) -> Tensor:
        """``[*lead, b, C]``: ``tensor`` (``leading`` extra dims, then the layer's output
        layout) summed over everything but the leading dims, the samples and the channels."""
        call = self.call
        channels = tensor.shape[-1]
        if call.batch_dim is None:  # one "sample": the whole call
            return tensor.reshape(*tensor.shape[:leading], 1, -1, channels).sum(-2)
        moved = tensor.movedim(leading + call.batch_dim, leading)
        return moved.reshape(*moved.shape[: leading + 1], -1, channels).sum(-2)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        x = self.call.args[0]
        rows = self._per_sample(self.call.grad(0) * x, leading=1)  # [T, b, C]
        return [rows.transpose(0, 1) for _ in params]  # [b, T, C]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        x = self.call.args[0]
        summed = self.call.weighted_grad(0, weights) * x  # Σ_k w_{·k} D[k] ⊙ X
        return [self._per_sample(summed, leading=0).sum(0) for _ in params]


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = Projection(6, 16)
        self.scale = ChannelScale(16)
        self.out = Projection(16, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.scale(self.inp(x)))).squeeze(-1)


def check_exact(model: Model, x: Tensor, y: Tensor) -> float:
    """The engine's per-sample Gramian against the explicit Jacobian's (one backward per loss)."""
    with Engine(model, batch_dim=0) as engine:
        losses = (model(x) - y).pow(2)
        params = engine.parameters()
        rows = [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in losses
        ]
        jacobian = torch.stack(rows)
        gramian = engine.compute_gramian(losses)
    return ((gramian - jacobian @ jacobian.T).abs().max() / gramian.abs().max()).item()


def main(steps: int = 30, batch_size: int = 16) -> float:
    torch.manual_seed(0)
    x = torch.randn(256, 6)
    y = torch.sin(x[:, 0]) + x[:, 1] * x[:, 2]
    model = Model()
    assert all(registered_rule(m) is not None for m in (model.inp, model.scale, model.out))
    error = check_exact(model.double(), x[:batch_size].double(), y[:batch_size].double())
    assert error < 1e-12, error
    model.float()
    adam = torch.optim.Adam(model.parameters(), lr=0.01)
    opt = JDOptimizer(adam, UPGrad(), modules=model, batch_dim=0)
    for _ in range(steps):
        index = torch.randint(0, len(x), (batch_size,))
        opt.zero_grad()
        opt.step((model(x[index]) - y[index]).pow(2))  # per-sample losses
    with torch.no_grad():
        loss = (model(x) - y).pow(2).mean().item()
    print(f"engine Gramian vs explicit Jacobian: relative error {error:.1e}; loss {loss:.4f}")
    return loss


if __name__ == "__main__":
    main()
