r"""``nn.Conv1d`` / ``nn.Conv2d`` (``groups = 1``, zero padding given as numbers).

After im2col (``F.unfold``), a convolution is a ``Linear`` layer applied at every output
position: ``a_{is}`` is the receptive field of position ``s`` (``C_in·∏k`` values), and the
weight ``[C_out, C_in, *k]`` is the matrix ``[C_out, C_in·∏k]``. The positions of a sample are its
output positions (times the module's own batch when there is no ``batch_dim``), and
:func:`~._contraction.linear_gramian` picks between the rows and the kernel contraction. A
``Conv1d`` is run as a ``Conv2d`` of height 1.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ._base import register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows
from .linear import LinearLikeRule


def _pair(value: object, spatial: int, lead: int = 1) -> tuple[int, int]:
    """A 2-D size; a 1-D one gets ``lead`` (1, or 0 for padding) for the added height."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial
    return (lead, *values) if spatial == 1 else values  # type: ignore[return-value]


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(LinearLikeRule):
    @classmethod
    def applies(cls, call: Call) -> bool:
        module = call.module
        x = call.record.sole_input
        if x is None:
            return False
        if module.groups != 1 or module.padding_mode != "zeros":  # type: ignore[union-attr]
            return False
        if isinstance(module.padding, str) and module.padding != "valid":  # type: ignore
            return False
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        return call.batch_dim is None or (call.batch_dim == 0 and x.dim() == spatial + 2)

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        module = call.module
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        x = full_precision(call.record.args[0].detach())
        channels = module.in_channels  # type: ignore[union-attr]
        images = x.reshape(-1, channels, *x.shape[-spatial:])
        if spatial == 1:
            images = images.unsqueeze(2)
        padding = 0 if module.padding == "valid" else module.padding  # type: ignore
        columns = F.unfold(
            images,
            kernel_size=_pair(module.kernel_size, spatial),
            dilation=_pair(module.dilation, spatial),
            padding=_pair(padding, spatial, 0),
            stride=_pair(module.stride, spatial),
        )  # [N, C_in·∏k, L]
        self.columns = columns.transpose(1, 2)  # [N, L, C_in·∏k]
        self.inputs = self.columns.reshape(call.b, -1, columns.shape[1])
        out = module.out_channels  # type: ignore[union-attr]
        grads = call.grad_samples_first(0)  # [T, b, ..., C_out, *spatial_out]
        grads = grads.reshape(call.T, call.b, -1, out, columns.shape[2]).transpose(3, 4)
        self.grads = grads.reshape(call.T, call.b, -1, out)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        module = self.call.module
        return [
            linear_rows(self.inputs, self.grads).reshape(self.call.b, self.call.T, *p.shape)
            if p is module.weight
            else bias_rows(self.grads)
            for p in params
        ]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        module = self.call.module
        out = module.out_channels  # type: ignore[union-attr]
        dw = self.call.weighted_grad(0, weights)
        length = self.columns.shape[1]
        dw = dw.reshape(-1, out, length).transpose(1, 2).reshape(-1, out)  # [N·L, C_out]
        columns = self.columns.reshape(-1, self.columns.shape[-1])
        return [(dw.T @ columns).view_as(p) if p is module.weight else dw.sum(0) for p in params]
