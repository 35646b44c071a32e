r"""``nn.Conv1d`` / ``nn.Conv2d``, any ``groups`` (grouped, depthwise), any padding.

After im2col (``F.unfold``), a convolution is a ``Linear`` layer applied at every output
position: ``a_{is}`` is the receptive field of position ``s`` (``C_in·∏k`` values), and the
weight ``[C_out, C_in, *k]`` is the matrix ``[C_out, C_in·∏k]``. The positions of a sample are its
output positions (times the module's own batch when there is no ``batch_dim``). Padding other
than plain zeros given as numbers (``"same"``, ``reflect``, ``replicate``, ``circular``) is
applied to the input first, exactly as the module's forward does. A ``Conv1d`` is run as a
``Conv2d`` of height 1.

With ``groups = 1``, the cost model of :func:`~._contraction.linear_gramian` picks between the
weight rows and the kernel contraction of the columns. With ``g`` groups, group ``j`` is its own
linear layer: outputs ``j·C_out/g … (j+1)·C_out/g - 1`` see only the receptive field
``a^{(j)}`` of input channels ``j·C_in/g …`` (``d' = C_in/g·∏k`` values, contiguous in im2col's
channel-major order), so the weight rows are
``g_{ik}[j·o'+q, :] = Σ_s D_{k,is}[j·o'+q] a^{(j)}_{is}`` for all groups at once (one batched
product); they are ``|W|`` wide (small for a depthwise convolution) and their Gram
matrix is the Gramian. On layers with many output positions the rows come instead from the
convolution's own weight-gradient kernel, vmapped over the rows: the same sums, without
unfolding the input (``ConvRule._direct_rows``).

The update ``Σ w_{ik} ∂ℓ_{ik}/∂W`` is the convolution's own weight gradient of the weighted
output gradient ``Σ_k w_{·k} D[k]``: one call of its backward kernel
(``aten.convolution_backward``), without im2col.
"""

from __future__ import annotations

import math
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call, full_precision
from ._contraction import contraction_cost, explicit_cost, linear_rows
from ._patches import unfold
from ._terms import GramianTerm
from .linear import PositionwiseLinearRule

#: A convolution module this rule handles.
_Conv = nn.Conv1d | nn.Conv2d
#: A size as a convolution module stores it: one number for every spatial dimension, or one each.
_Size = int | tuple[int, ...]


def _pair(value: _Size, spatial: int, lead: int = 1) -> tuple[int, int]:
    """A 2-D size; a 1-D one gets ``lead`` (1, or 0 for padding) for the added height."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial
    return (lead, values[0]) if spatial == 1 else (values[0], values[1])


def _padded(module: _Conv, x: Tensor, spatial: int) -> tuple[Tensor, _Size]:
    """The module's input as ``[N, C_in, *spatial]``, with the padding that is not plain zeros
    given as numbers applied (as the module's forward does), and the padding still to apply."""
    images = x.reshape(-1, module.in_channels, *x.shape[-spatial:])
    padding = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(images, module._reversed_padding_repeated_twice, mode=mode), 0
    return images, padding


def _columns(module: _Conv, images: Tensor, padding: _Size, spatial: int) -> Tensor:
    """im2col of the (padded) input as ``[N, C_in·∏k, L]``."""
    if spatial == 1:
        images = images.unsqueeze(2)
    return unfold(
        images,
        _pair(module.kernel_size, spatial),
        dilation=_pair(module.dilation, spatial),
        padding=_pair(padding, spatial, 0),
        stride=_pair(module.stride, spatial),
    )


def _sizes(value: _Size, spatial: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * spatial


#: Output positions per image from which task rows of the weight come from the convolution's
#: weight-gradient kernel instead of im2col (see ``ConvRule._direct_rows``).
DIRECT_FROM_POSITIONS = 128
#: The same for per-sample rows (one image per row), where the crossover comes later.
DIRECT_PER_SAMPLE_FROM_POSITIONS = 256


@register_rule(nn.Conv1d, nn.Conv2d)
class ConvRule(PositionwiseLinearRule[_Conv]):
    grouped_samples = True  # images folded into the sample dimension: n images per sample

    @classmethod
    def applies(cls, call: Call) -> bool:
        x = call.record.sole_input
        if x is None or not cls.differentiates_attributes(call, "weight", "bias"):
            return False
        spatial = 1 if isinstance(call.module, nn.Conv1d) else 2
        return call.batch_dim is None or (call.batch_dim == 0 and x.dim() == spatial + 2)

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        module = self.module
        self.spatial = 1 if isinstance(module, nn.Conv1d) else 2
        x = full_precision(call.record.args[0].detach())
        self.images, self.padding = _padded(module, x, self.spatial)  # [N, C_in, *spatial]
        self.groups = module.groups

    @cached_property
    def columns(self) -> Tensor:
        """im2col as ``[N, L, C_in·∏k]``."""
        columns = _columns(self.module, self.images, self.padding, self.spatial)
        return columns.transpose(1, 2)

    def weight_of(self) -> Tensor:
        return self.module.weight

    @cached_property
    def inputs(self) -> Tensor:
        return self.columns.reshape(self.call.b, -1, self.columns.shape[-1])

    @cached_property
    def grads(self) -> Tensor:
        call = self.call
        out = self.module.out_channels
        length = self.columns.shape[1]
        grads = call.grad_samples_first(0)  # [T, b, ..., C_out, *spatial_out]
        grads = grads.reshape(call.T, call.b, -1, out, length).transpose(3, 4)
        return grads.reshape(call.T, call.b, -1, out)

    def _conv_sizes(self) -> tuple[list[int], list[int], list[int]]:
        """Stride, padding and dilation as ``aten.convolution_backward`` takes them."""
        module = self.module
        return (
            _sizes(module.stride, self.spatial),
            _sizes(self.padding, self.spatial),
            _sizes(module.dilation, self.spatial),
        )

    @cached_property
    def _positions(self) -> int:
        """Output positions per image, from the recorded output's shape (``[..., *spatial]``)."""
        return math.prod(self.call.record.tapped[0].shape[-self.spatial :])

    @cached_property
    def _output_grads(self) -> Tensor:
        """``D`` as ``[T, b, n, C_out, *spatial_out]`` (``n`` images per sample)."""
        call = self.call
        grads = call.grad_samples_first(0)  # [T, b, ..., C_out, *spatial_out]
        spatial_out = grads.shape[grads.dim() - self.spatial :]
        out = self.module.out_channels
        return grads.reshape(call.T, call.b, -1, out, *spatial_out).to(self.images.dtype)

    def _weight_rows(self) -> Tensor:
        """The weight rows ``∂ℓ_{ik}/∂W`` as ``[b, T, *W.shape]``, by the faster route for
        this layer (:meth:`_direct_rows`)."""
        call = self.call
        shape = self.weight_of().shape
        if self._direct_rows():
            return self._weight_rows_direct()
        return self._weight_rows_im2col().reshape(call.b, call.T, *shape)

    def _direct_rows(self) -> bool:
        """Whether the weight rows come from the convolution's own weight-gradient kernel
        (:meth:`_weight_rows_direct`) rather than from the im2col columns: on layers of at
        least :data:`DIRECT_FROM_POSITIONS` output positions per image for task rows (``b = 1``,
        every row over the same images), :data:`DIRECT_PER_SAMPLE_FROM_POSITIONS` for
        per-sample rows. Measured on CPU (ResNet-18 shapes, batch 8): task rows (2 / 8) 1.0–2.3×
        faster than im2col from 16×16 positions up, per-sample rows 1.2–1.3× from 16×16 up; and
        it never unfolds the input (``∏k`` times its size). Below, with many channels on few
        positions, im2col's one product is up to 3× faster."""
        per_sample = self.call.b > 1
        threshold = DIRECT_PER_SAMPLE_FROM_POSITIONS if per_sample else DIRECT_FROM_POSITIONS
        return self._positions >= threshold

    def _weight_rows_im2col(self) -> Tensor:
        """``[b, T, C_out, d']`` (``d' = C_in/g·∏k``) from the im2col columns: group ``j``'s
        rows ``Σ_s D_{k,is}[j·o'+q] a^{(j)}_{is}``, all groups in one product."""
        if self.groups == 1:
            return linear_rows(self.inputs, self.grads)
        t, b, s, out = self.grads.shape
        g = self.groups
        inputs = self.inputs.reshape(b, s, g, -1)
        grads = self.grads.reshape(t, b, s, g, out // g)
        rows = torch.einsum("kisgo,isgd->ikgod", grads, inputs)
        return rows.reshape(b, t, out, -1)

    def _weight_rows_direct(self) -> Tensor:
        r"""The weight rows as ``[b, T, *W.shape]``, each from the convolution's own
        weight-gradient kernel (``aten.convolution_backward``) on row ``(i, k)`` of the output
        gradient and sample ``i``'s images, all rows in one ``torch.vmap``: the same sums as
        im2col's ``Σ_s D_{k,is} a_{is}ᵀ`` without unfolding the input."""
        call = self.call
        grads = self._output_grads
        images = self.images.reshape(call.b, -1, *self.images.shape[1:])  # [b, n, C_in, ...]
        weight = self.weight_of().detach().to(images.dtype)
        stride, padding, dilation = self._conv_sizes()
        spatial, groups = self.spatial, self.groups

        def weight_grad(grad: Tensor, sample_images: Tensor) -> Tensor:
            return torch.ops.aten.convolution_backward(
                grad,
                sample_images,
                weight,
                None,
                stride,
                padding,
                dilation,
                False,
                [0] * spatial,
                groups,
                [False, True, False],
            )[1]

        over_samples = torch.vmap(weight_grad)
        rows = torch.vmap(over_samples, in_dims=(0, None))(grads, images)  # [T, b, *W]
        return rows.transpose(0, 1)

    def _bias_rows(self) -> Tensor:
        """``Σ`` of the output gradient over images and positions: ``[b, T, C_out]``."""
        grads = self._output_grads
        dims = [2, *range(4, grads.dim())]
        return grads.sum(dim=dims).transpose(0, 1)

    def _rows_cheaper(self, with_bias: bool) -> bool:
        """Whether the (ungrouped) weight rows cost less than the kernel contraction of the
        im2col columns: the choice :func:`~._contraction.linear_gramian` makes on them by flops,
        from the shapes alone (without unfolding the input). By flops in the low-memory step
        too, where a ``Linear`` is chosen by the entries each method forms
        (:func:`~._contraction.fewest_entries`): for a convolution that count would have to
        include the unfolded columns (``b·P·C_in·k²``), which it leaves out."""
        call, module = self.call, self.module
        positions = self.images.shape[0] // call.b * self._positions
        width = module.in_channels * math.prod(_sizes(module.kernel_size, self.spatial))
        sizes = (call.b, positions, call.T, width + with_bias, module.out_channels)
        return explicit_cost(*sizes) < contraction_cost(*sizes)

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        """The weight rows (:meth:`_weight_rows`) where they are the cheaper method (the cost
        model's choice, as for a Linear), and always with groups (each group sees its own
        channels, which one kernel over all the columns would mix); else the kernel term of
        the im2col columns."""
        weight = self.weight_of()
        with_bias = any(p is not weight for p in params)
        if self.groups == 1 and not self._rows_cheaper(with_bias):
            return super().factorisation(params)
        return LayerRule.factorisation(self, params)

    def forms_rows(self, params: list[Tensor]) -> bool:
        """As :meth:`factorisation` chooses, from the shapes alone (no im2col)."""
        weight = self.weight_of()
        if all(p is not weight for p in params):  # the bias: its summed rows
            return True
        return self.groups != 1 or self._rows_cheaper(any(p is not weight for p in params))

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        weight = self.weight_of()
        return [self._weight_rows() if p is weight else self._bias_rows() for p in params]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        """One call of the convolution's own weight-gradient kernel on the weighted output
        gradient ``Σ_k w_{·k} D[k]`` (no im2col)."""
        module = self.module
        weight = self.weight_of()
        out = module.out_channels
        dw = self.call.weighted_grad(0, weights)
        dw = dw.reshape(-1, out, *dw.shape[dw.dim() - self.spatial :])
        has_bias = any(p is not weight for p in params)
        _, dweight, dbias = torch.ops.aten.convolution_backward(
            dw,
            self.images.to(dw.dtype),
            weight.detach().to(dw.dtype),
            [out] if has_bias else None,
            _sizes(module.stride, self.spatial),
            _sizes(self.padding, self.spatial),
            _sizes(module.dilation, self.spatial),
            False,
            [0] * self.spatial,
            self.groups,
            [False, True, has_bias],
        )
        return [dweight if p is weight else dbias for p in params]
