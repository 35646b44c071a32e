r"""``nn.PReLU``: ``y = max(0, x) + a ⊙ min(0, x)``, one slope ``a`` or one per channel.

Its slope's gradient is ``∂ℓ/∂a_c = Σ D ⊙ min(0, x)`` over every position of channel ``c`` (every
position, for one slope), so a sample's row sums ``D ⊙ min(0, x)`` over its own positions: one
product and one sum per call, the rows held for the update as a norm's affine rows are. (Without
this rule the generic rule's per-sample re-run gave PReLU a rank-1-lower input, whose channel
dimension torch reads differently: the engine's check caught it and re-ran it on the whole
batch.) The channel dimension is torch's: 1, or 0 for a 1-D input.
"""

from __future__ import annotations

from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call, full_precision


def _channel_dim(module: nn.PReLU, x: Tensor) -> int | None:
    """The dimension of ``x`` that indexes the slopes (``None`` for one slope)."""
    if module.num_parameters == 1:
        return None
    return 1 if x.dim() >= 2 else 0


@register_rule(nn.PReLU)
class PReLURule(LayerRule[nn.PReLU]):
    """Rows ``Σ D ⊙ min(0, x)`` per sample and channel (module docs)."""

    @classmethod
    def applies(cls, call: Call) -> bool:
        x = call.record.sole_input
        if x is None or x.dim() == 0 or not cls.differentiates_attributes(call, "weight"):
            return False
        channel = _channel_dim(cls.module_of(call), x)
        return call.batch_dim is None or (call.batch_dim < x.dim() and call.batch_dim != channel)

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        x = full_precision(call.record.args[0].detach())
        self.negative = x.clamp(max=0)
        self.channel = _channel_dim(self.module, x)

    def _summed(self, product: Tensor, leading: int, sample: int | None) -> Tensor:
        """``product`` (``leading`` extra dimensions, then a module tensor) summed over every
        dimension but the leading ones, ``sample`` and the channel: ``[..., (b,) (C)]``."""
        keep = list(range(leading))
        if sample is not None:
            keep.append(leading + sample)
        if self.channel is not None:
            keep.append(leading + self.channel)
        rest = [d for d in range(product.dim()) if d not in keep]
        return product.sum(dim=rest) if rest else product

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        call = self.call
        rows = self._summed(call.grad(0) * self.negative, 1, call.batch_dim)  # [T, (b,) (C)]
        if call.batch_dim is None:
            rows = rows.unsqueeze(1)
        rows = rows.transpose(0, 1).reshape(call.b, call.T, *self.module.weight.shape)
        return [rows for _ in params]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        dw = self.call.weighted_grad(0, weights)
        grad = self._summed(dw * self.negative, 0, None).reshape(self.module.weight.shape)
        return [grad for _ in params]
