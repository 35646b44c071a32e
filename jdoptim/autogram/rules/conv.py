r"""``nn.Conv1d`` / ``nn.Conv2d``, any ``groups`` (grouped, depthwise), any padding.

After im2col (``F.unfold``), a convolution is a ``Linear`` layer applied at every output
position: ``a_{is}`` is the receptive field of position ``s`` (``C_in·∏k`` values), and the
weight ``[C_out, C_in, *k]`` is the matrix ``[C_out, C_in·∏k]``. The positions of a sample are its
output positions (times the module's own batch when there is no ``batch_dim``). Padding other
than plain zeros given as numbers (``"same"``, ``reflect``, ``replicate``, ``circular``) is
applied to the input first, exactly as the module's forward does. A ``Conv1d`` is run as a
``Conv2d`` of height 1.

With ``groups = 1``, :func:`~._contraction.linear_gramian` picks between the rows and the kernel
contraction. With ``g`` groups, group ``j`` is its own linear layer: outputs
``j·C_out/g … (j+1)·C_out/g - 1`` see only the receptive field ``a^{(j)}`` of input channels
``j·C_in/g …`` (``d' = C_in/g·∏k`` values, contiguous in im2col's channel-major order), so the
weight rows are ``g_{ik}[j·o'+q, :] = Σ_s D_{k,is}[j·o'+q] a^{(j)}_{is}`` for all groups at once
(one batched product); they are ``|W|`` wide (small for a depthwise convolution) and their Gram
matrix is the Gramian.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows
from .linear import PositionwiseLinearRule


def _pair(value: object, spatial: int, lead: int = 1) -> tuple[int, int]:
    """A 2-D size; a 1-D one gets ``lead`` (1, or 0 for padding) for the added height."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial
    return (lead, *values) if spatial == 1 else values  # type: ignore[return-value]


def _columns(module: nn.Module, x: Tensor, spatial: int) -> Tensor:
    """im2col of the module's input as ``[N, C_in·∏k, L]``."""
    channels = module.in_channels  # type: ignore[union-attr]
    images = x.reshape(-1, channels, *x.shape[-spatial:])
    padding = module.padding  # type: ignore[union-attr]
    if module.padding_mode != "zeros" or isinstance(padding, str):  # type: ignore[union-attr]
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode  # type: ignore
        images = F.pad(images, module._reversed_padding_repeated_twice, mode=mode)  # type: ignore
        padding = 0
    if spatial == 1:
        images = images.unsqueeze(2)
    return F.unfold(
        images,
        kernel_size=_pair(module.kernel_size, spatial),
        dilation=_pair(module.dilation, spatial),
        padding=_pair(padding, spatial, 0),
        stride=_pair(module.stride, spatial),
    )


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(PositionwiseLinearRule):
    @classmethod
    def applies(cls, call: Call) -> bool:
        x = call.record.sole_input
        if x is None:
            return False
        spatial = 1 if isinstance(call.module, nn.Conv1d) else 2
        return call.batch_dim is None or (call.batch_dim == 0 and x.dim() == spatial + 2)

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        module = call.module
        spatial = 1 if isinstance(module, nn.Conv1d) else 2
        x = full_precision(call.record.args[0].detach())
        columns = _columns(module, x, spatial)  # [N, C_in·∏k, L]
        self.groups: int = module.groups  # type: ignore[assignment]
        self.columns = columns.transpose(1, 2)  # [N, L, C_in·∏k]
        self.inputs = self.columns.reshape(call.b, -1, columns.shape[1])
        out = module.out_channels  # type: ignore[union-attr]
        grads = call.grad_samples_first(0)  # [T, b, ..., C_out, *spatial_out]
        grads = grads.reshape(call.T, call.b, -1, out, columns.shape[2]).transpose(3, 4)
        self.grads = grads.reshape(call.T, call.b, -1, out)

    def _weight_rows(self) -> Tensor:
        """``[b, T, C_out, d']`` (``d' = C_in/g·∏k``)."""
        if self.groups == 1:
            return linear_rows(self.inputs, self.grads)
        t, b, s, out = self.grads.shape
        g = self.groups
        inputs = self.inputs.reshape(b, s, g, -1)
        grads = self.grads.reshape(t, b, s, g, out // g)
        rows = torch.einsum("kisgo,isgd->ikgod", grads, inputs)
        return rows.reshape(b, t, out, -1)

    def gramian(self, params: list[Tensor]) -> Tensor:
        if self.groups == 1:
            return super().gramian(params)
        return LayerRule.gramian(self, params)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        weight = self.weight_of()
        call = self.call
        return [
            self._weight_rows().reshape(call.b, call.T, *p.shape)
            if p is weight
            else bias_rows(self.grads)
            for p in params
        ]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        weight = self.weight_of()
        out = self.call.module.out_channels  # type: ignore[union-attr]
        dw = self.call.weighted_grad(0, weights)
        length = self.columns.shape[1]
        dw = dw.reshape(-1, out, length).transpose(1, 2).reshape(-1, out)  # [N·L, C_out]
        columns = self.columns.reshape(-1, self.columns.shape[-1])
        g = self.groups
        if g == 1:
            dweight = dw.T @ columns
        else:
            grouped = torch.einsum(
                "ngo,ngd->god",
                dw.reshape(-1, g, out // g),
                columns.reshape(-1, g, columns.shape[1] // g),
            )
            dweight = grouped.reshape(out, -1)
        return [dweight.reshape(p.shape) if p is weight else dw.sum(0) for p in params]
