r"""``nn.Linear``: ``Y = X Wᵀ + β`` on inputs ``X`` of shape ``[..., d]``.

The positions ``S`` are all dimensions of ``X`` but the sample dimension and the last one (one
position per sample for an ``[batch, d]`` input; ``seq`` positions for ``[batch, seq, d]``). The
weight's Gramian uses :func:`~._contraction.linear_gramian` (``(XXᵀ) ⊙ (DDᵀ)`` for ``S = 1``);
the update is one matrix product ``D_wᵀ X`` with ``D_w = Σ_k w_{·k} D[k]``.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows, weight_and_bias_gramian


class LinearLikeRule(LayerRule):
    """A layer ``Y_s = W a_s (+ β)`` at every position ``s`` (``Linear``; ``Conv`` after im2col):
    subclasses set ``inputs`` (``a``, ``[b, S, d]``) and ``grads`` (``D``, ``[T, b, S, o]``)."""

    inputs: Tensor
    grads: Tensor

    def gramian(self, params: list[Tensor]) -> Tensor:
        weight = self.call.module.weight  # type: ignore[union-attr]
        return weight_and_bias_gramian(self.inputs, self.grads, params, weight)


@register_rule(nn.Linear)
class LinearRule(LinearLikeRule):
    @classmethod
    def applies(cls, call: Call) -> bool:
        x = call.record.sole_input
        if x is None or x.dim() < 1:
            return False
        return call.batch_dim is None or call.batch_dim < x.dim() - 1

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        x = full_precision(call.record.args[0].detach())
        self.x = x
        self.inputs = call.samples_first(x).reshape(call.b, -1, x.shape[-1])
        out = call.module.out_features  # type: ignore[union-attr]
        self.grads = call.grad_samples_first(0).reshape(call.T, call.b, -1, out)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        module = self.call.module
        return [
            linear_rows(self.inputs, self.grads) if p is module.weight else bias_rows(self.grads)
            for p in params
        ]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        module = self.call.module
        dw = self.call.weighted_grad(0, weights)
        dw = dw.reshape(-1, dw.shape[-1])
        return [
            dw.T @ self.x.reshape(-1, self.x.shape[-1]) if p is module.weight else dw.sum(0)
            for p in params
        ]
