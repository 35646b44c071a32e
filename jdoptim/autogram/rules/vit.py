r"""transformers' ``ViTEmbeddings``: the patch projection, the class token and the position
embedding of a ViT, in one module with direct parameters.

For pixels ``x_i``, patches ``a_{is}`` (``s = 1..n``, non-overlapping: the projection is a
``Conv2d`` whose stride is its kernel), the call computes

.. math::  Y_{i0} = c + P_0, \qquad Y_{is} = W a_{is} + β + P_s \quad (s ≥ 1),

so with ``D = ∂ℓ_{ik}/∂Y_i`` the rows are ``∂ℓ_{ik}/∂c = D_{i0}``, ``∂ℓ_{ik}/∂P = D_i`` and, for the
projection, those of a ``Linear`` layer on the patches (``Σ_s D_{is} a_{is}ᵀ`` and ``Σ_s D_{is}``).
The projection's Gramian is the kernel contraction of :mod:`._contraction`
(:class:`~._terms.KernelTerm`), the class token's and position embedding's their explicit rows
(``d`` and ``(n+1)·d`` numbers per row). The generic rule re-ran the module per sample with
``torch.func`` (about a quarter of a plain step on the benchmark's ViT).

The rule applies to the call ``embeddings(pixel_values)`` with no masked positions, no
interpolated position encoding and its dropout inactive (``eval()`` or ``p = 0``, as in
transformers' default config: the output gradient is then the pre-dropout one); other calls go
through the generic rule, which replays the call's random draws (``replays``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._base import LayerRule, qualified_name, register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows
from ._patches import patches_last
from ._terms import GramianTerm, KernelTerm, RowsTerm

_VIT = "transformers.models.vit.modeling_vit"


def _pixel_values(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """The pixels of a call ``embeddings(pixel_values)`` with no other argument but the
    defaults (``bool_masked_pos=None``, ``interpolate_pos_encoding=False``), else ``None``."""
    rest = dict(kwargs)
    pixels = args[0] if args else rest.pop("pixel_values", None)
    given = list(args[1:])
    if len(given) > 2:
        return None
    options = {"bool_masked_pos": None, "interpolate_pos_encoding": False}
    for name, value in zip(options, given):
        options[name] = value
    for name, value in rest.items():
        if name not in options:
            return None
        options[name] = value
    masked, interpolate = options.values()
    if masked is not None or interpolate or not isinstance(pixels, Tensor):
        return None  # (ViTModel passes interpolate_pos_encoding=None for False)
    return pixels


def _patch_projection(module: nn.Module) -> nn.Conv2d | None:
    """The patch embedding's ``Conv2d`` when it cuts the image into non-overlapping patches
    (stride = kernel, no padding, dilation or groups) and nothing overrides the forwards."""
    patches = getattr(module, "patch_embeddings", None)
    if patches is None or "forward" in patches.__dict__:
        return None
    if qualified_name(type(patches)) != f"{_VIT}.ViTPatchEmbeddings":
        return None
    conv = getattr(patches, "projection", None)
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return None
    if "forward" in conv.__dict__ or conv.groups != 1 or conv.padding_mode != "zeros":
        return None
    if conv.stride != conv.kernel_size or conv.dilation != (1, 1):
        return None
    if conv.padding not in ((0, 0), "valid"):
        return None
    return conv


def _parameters(module: nn.Module, conv: nn.Conv2d) -> dict[str, Tensor | None]:
    """The module's parameters by the rule's names (``None`` where absent)."""
    found: dict[str, Tensor | None] = {"weight": conv.weight, "bias": conv.bias}
    for name, attribute in (("cls", "cls_token"), ("position", "position_embeddings")):
        value = getattr(module, attribute, None)
        found[name] = value if isinstance(value, Tensor) else None
    return found


@register_rule(f"{_VIT}.ViTEmbeddings")
class ViTEmbeddingsRule(LayerRule[nn.Module]):
    #: calls the rule does not apply to go through the generic rule, which re-runs them: the
    #: engine records their random draws
    replays = True

    @classmethod
    def applies(cls, call: Call) -> bool:
        module = call.module
        if _pixel_values(call.record.args, call.record.kwargs) is None:
            return False
        conv = _patch_projection(module)
        if conv is None or len(call.record.tapped) != 1:
            return False
        dropout = getattr(module, "dropout", None)
        if not isinstance(dropout, nn.Dropout) or (dropout.training and dropout.p > 0):
            return False
        if call.batch_dim not in (None, 0):
            return False
        known = {id(t) for t in _parameters(module, conv).values() if t is not None}
        return all(id(p) in known for p in call.params)

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        conv = _patch_projection(call.module)
        assert conv is not None
        pixels = _pixel_values(call.record.args, call.record.kwargs)
        assert pixels is not None
        self.conv = conv
        self.names = {id(t): n for n, t in _parameters(call.module, conv).items() if t is not None}
        # [B, n, C·kh·kw], in the projection's output order (stride = kernel: _patch_projection)
        kh, kw = conv.kernel_size
        patches = patches_last(full_precision(pixels), (kh, kw))
        self.patches = patches
        b, t = call.b, call.T
        width = patches.shape[-1]
        self.inputs = call.samples_first(patches).reshape(b, -1, width)  # [b, S, C·kh·kw]
        grads = call.grad_samples_first(0)  # [T, b, (B,) 1 + n, d]
        tokens, dim = grads.shape[-2], grads.shape[-1]
        grads = grads.reshape(t, b, -1, tokens, dim)  # [T, b, B/b, 1 + n, d]
        self.grads = grads[:, :, :, 1:].reshape(t, b, -1, dim)  # the patches' D, [T, b, S, d]
        # [T, b, 1 + n, d]: summed over each sample's images (one per sample: a view)
        self.token_grads = grads[:, :, 0] if grads.shape[2] == 1 else grads.sum(2)

    def _rows(self, name: str) -> Tensor:
        b, t = self.call.b, self.call.T
        if name == "cls":
            return self.token_grads[:, :, :1].transpose(0, 1).reshape(b, t, 1, 1, -1)
        if name == "position":
            return self.token_grads.transpose(0, 1).unsqueeze(2)
        if name == "bias":
            return bias_rows(self.grads)
        rows = linear_rows(self.inputs, self.grads)  # [b, T, d, C·kh·kw]
        return rows.reshape(b, t, *self.conv.weight.shape)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        return [self._rows(self.names[id(p)]) for p in params]

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        """The projection's :class:`~._terms.KernelTerm` and the tokens' rows."""
        names = [self.names[id(p)] for p in params]
        tokens = [n for n in names if n in ("cls", "position")]
        terms: list[GramianTerm] = [RowsTerm(self._rows(n)) for n in tokens]
        weight, bias = "weight" in names, "bias" in names
        if weight or bias:
            terms.append(KernelTerm(self.inputs, self.grads, weight, bias))
        return terms

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        dw = self.call.weighted_grad(0, weights)  # [B, 1 + n, d]
        dim = dw.shape[-1]
        patches_dw = dw[:, 1:].reshape(-1, dim)
        grads = []
        for p in params:
            name = self.names[id(p)]
            if name == "cls":
                grad = dw[:, :1].sum(0, keepdim=True)
            elif name == "position":
                grad = dw.sum(0, keepdim=True)
            elif name == "bias":
                grad = patches_dw.sum(0)
            else:
                grad = patches_dw.T @ self.patches.reshape(-1, self.patches.shape[-1])
            grads.append(grad.reshape(p.shape))
        return grads


__all__ = ["ViTEmbeddingsRule"]
