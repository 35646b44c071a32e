r"""``nn.Linear``: ``Y = X Wᵀ + β`` on inputs ``X`` of shape ``[..., d]``.

The positions ``S`` are all dimensions of ``X`` but the sample dimension and the last one (one
position per sample for an ``[batch, d]`` input; ``seq`` positions for ``[batch, seq, d]``). The
weight's Gramian uses :func:`~._contraction.linear_gramian` (``(XXᵀ) ⊙ (DDᵀ)`` for ``S = 1``);
the update is one matrix product ``D_wᵀ X`` with ``D_w = Σ_k w_{·k} D[k]``.
"""

from __future__ import annotations

from functools import cached_property

from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows, per_sample_gramian, weight_and_bias_gramian


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
    """``Linear`` calls. The common per-sample case (``batch_dim=0``, one loss per sample, a
    ``[b, d]`` input: ``S = 1``) works on the 2-D ``A`` (``b × d``) and ``D`` (``b × o``)
    directly: ``G = (A Aᵀ + 1) ⊙ (D Dᵀ)`` and ``∇W = (w ⊙ D)ᵀ A``, without the
    ``[b, S, d]`` / ``[T, b, S, o]`` views of the general path."""

    @classmethod
    def applies(cls, call: Call) -> bool:
        x = call.record.sole_input
        if x is None or x.dim() < 1:
            return False
        return call.batch_dim is None or call.batch_dim < x.dim() - 1

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        self.x = full_precision(call.record.args[0])  # the engine runs rules under no_grad
        #: ``(A, D)`` as ``b × d`` and ``b × o`` in the per-sample ``S = 1`` case, else ``None``.
        self.rows_2d: tuple[Tensor, Tensor] | None = None
        if call.T == 1 and call.batch_dim == 0 and self.x.dim() == 2:
            grad = call.grads[0]
            if grad is not None and not call.stacked:
                self.rows_2d = (self.x, full_precision(grad))
            else:
                self.rows_2d = (self.x, call.grad(0).view(call.b, -1))

    @cached_property
    def inputs(self) -> Tensor:  # type: ignore[override]
        return self.call.samples_first(self.x).reshape(self.call.b, -1, self.x.shape[-1])

    @cached_property
    def grads(self) -> Tensor:  # type: ignore[override]
        out = self.call.module.out_features  # type: ignore[union-attr]
        return self.call.grad_samples_first(0).reshape(self.call.T, self.call.b, -1, out)

    def gramian(self, params: list[Tensor]) -> Tensor:
        weight = self.call.module.weight  # type: ignore[union-attr]
        if self.rows_2d is not None and any(p is weight for p in params):
            inputs, grads = self.rows_2d
            return per_sample_gramian(inputs, grads, with_bias=len(params) > 1)
        return super().gramian(params)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        module = self.call.module
        return [
            linear_rows(self.inputs, self.grads) if p is module.weight else bias_rows(self.grads)
            for p in params
        ]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        module = self.call.module
        if self.rows_2d is not None:  # weights: [b, 1]
            inputs, grads = self.rows_2d
            dw = grads * weights.to(grads.dtype)
        else:
            dw = self.call.weighted_grad(0, weights)
            dw = dw.reshape(-1, dw.shape[-1])
            inputs = self.x.reshape(-1, self.x.shape[-1])
        return [dw.T @ inputs if p is module.weight else dw.sum(0) for p in params]
