r"""Affine parameters of normalisation layers: ``LayerNorm`` (with or without bias),
``RMSNorm``, ``GroupNorm``, ``BatchNorm{1,2,3}d``, and the weight-only RMS norms of transformers'
Llama (also Mistral's and Qwen2's copies) and T5, recognised by qualified class name.

Each computes ``Y = X̂ ⊙ γ + β`` where ``X̂`` (the normalised input) does not depend on ``γ, β``.
So ``∂ℓ_{ik}/∂γ_c = Σ D[k]_{i,·,c,·} X̂_{i,·,c,·}`` and ``∂ℓ_{ik}/∂β_c = Σ D[k]_{i,·,c,·}``:
sums over every dimension but the sample and the channel dimensions. ``X̂`` comes from the
call's autograd graph where it is there (:meth:`NormAffineRule.read_graph`): ``LayerNorm``'s and
``GroupNorm``'s kernels, and ``BatchNorm``'s in training mode, saved each group's ``μ`` and
``1/σ``, so ``X̂ = (X − μ)/σ`` is two elementwise operations; an RMS norm's last product
``γ ⊙ X̂`` saved ``X̂`` itself. Elsewhere (``BatchNorm`` in eval mode, a checkpointed forward) it
is recomputed once, without affine and without touching running statistics (in training mode a
``BatchNorm`` normalises with the batch's statistics, exactly as its forward did). The rows are
only ``C`` wide, so they are always formed explicitly.

transformers' norms compute ``X̂`` in their own precision: Llama's casts ``X`` to float32,
normalises and casts back to the input's dtype; T5's takes the mean square in float32 and
multiplies the input by its inverse root. The rule recomputes ``X̂`` by the same operations, so
the rows are exact in every dtype. Both families end their forward with the product ``γ ⊙ X̂``,
whose autograd node saved ``X̂`` for ``γ``'s gradient: the step reads it there before its backward
pass frees it, so that these norms cost no recompute (about 80 µs per call inside a CPU step of a
small Llama); where the product is not found, the rule recomputes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ._base import LayerRule, register_rule
from ._call import Call, full_precision

_NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GroupNorm, _BatchNorm)
if hasattr(nn, "RMSNorm"):
    _NORMS = (*_NORMS, nn.RMSNorm)
_LLAMA_NORMS = (
    "transformers.models.llama.modeling_llama.LlamaRMSNorm",
    "transformers.models.mistral.modeling_mistral.MistralRMSNorm",
    "transformers.models.qwen2.modeling_qwen2.Qwen2RMSNorm",
)
_T5_NORM = "transformers.models.t5.modeling_t5.T5LayerNorm"


class _WeightOnlyRMSNorm(Protocol):
    """What the rule reads of transformers' weight-only RMS norms (Llama's and T5's)."""

    weight: Tensor
    variance_epsilon: float


class _ShapedNorm(Protocol):
    """``LayerNorm`` and ``RMSNorm``: normalised over their last ``len(normalized_shape)`` dims."""

    normalized_shape: tuple[int, ...]


def _transformers_norm(module: nn.Module) -> str | None:
    """``"llama"`` or ``"t5"`` for transformers' weight-only RMS norms, else ``None``."""
    kind = type(module)
    if kind.__module__.startswith("transformers."):
        name = f"{kind.__module__}.{kind.__qualname__}"
        if name in _LLAMA_NORMS:
            return "llama"
        if name == _T5_NORM:
            return "t5"
    return None


def _mean_square_root(x: Tensor, eps: float) -> Tensor:
    """``1/√(mean(x²) + ε)`` over the last dimension, in float32 as transformers computes it."""
    return torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + eps)


def _normalised(module: nn.Module, x: Tensor) -> Tensor:
    family = _transformers_norm(module)
    if family is not None:
        # (both families have these attributes; a cast, as isinstance on a Protocol costs ~40 µs)
        rms = cast(_WeightOnlyRMSNorm, module)
        scale = _mean_square_root(x, rms.variance_epsilon)
        if family == "llama":
            return (x.to(torch.float32) * scale).to(x.dtype)
        normalised = x * scale  # T5
        half = rms.weight.dtype in (torch.float16, torch.bfloat16)
        return normalised.to(rms.weight.dtype) if half else normalised
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, _BatchNorm):
        batch_stats = module.training or module.running_mean is None
        mean = None if batch_stats else module.running_mean
        var = None if batch_stats else module.running_var
        return F.batch_norm(x, mean, var, None, None, batch_stats, 0.0, module.eps)
    assert isinstance(module, nn.RMSNorm)  # the last registered norm (torch >= 2.4)
    return F.rms_norm(x, list(module.normalized_shape), None, module.eps)


def _channel_dims(module: nn.Module, x: Tensor) -> list[int]:
    if _transformers_norm(module) is not None:
        return [x.dim() - 1]
    if isinstance(module, nn.LayerNorm) or type(module).__name__ == "RMSNorm":
        count = len(cast(_ShapedNorm, module).normalized_shape)  # (no isinstance on a Protocol)
        return list(range(x.dim() - count, x.dim()))
    return [1]


def _multiplied_by(node: torch.autograd.graph.Node, weight: Tensor) -> Tensor | None:
    """``X̂`` when ``node`` is the product ``γ ⊙ X̂`` of the leaf ``weight`` (``γ``, found by the
    node's input edge into it) by another tensor, which the node saved for ``γ``'s gradient;
    else ``None``."""
    if type(node).__name__ != "MulBackward0":
        return None
    edges = node.next_functions
    sides = [getattr(child, "variable", None) is weight for child, _ in edges]
    if sides != [True, False] and sides != [False, True]:
        return None
    try:  # the other operand's value (saved because γ requires its gradient)
        saved = node._saved_other if sides[0] else node._saved_self  # type: ignore[attr-defined]
    except RuntimeError:  # (already freed: a graph run backward through)
        return None
    return saved.detach() if isinstance(saved, Tensor) else None  # (no graph held: see below)


#: torch's fused norm kernels, whose autograd nodes save the statistics ``μ, 1/σ`` of each group
#: (a batch norm's only in training mode, from the batch)
_STATISTICS_NODES = (
    "NativeLayerNormBackward0",
    "NativeGroupNormBackward0",
    "NativeBatchNormBackward0",
)


@dataclass(frozen=True)
class _Statistics:
    """``μ`` and ``1/σ`` as a ``LayerNorm``'s, ``GroupNorm``'s or training ``BatchNorm``'s fused
    kernel saved them."""

    mean: Tensor
    rstd: Tensor

    def normalised(self, x: Tensor, module: nn.Module) -> Tensor:
        """``X̂ = (X − μ) / σ``: two elementwise operations, where recomputing the norm without
        its affine reduces ``X`` again (measured on CPU: 6 against 20 µs at ``[8, 16, 32]``,
        144 against 420 µs at ``[8, 128, 256]``)."""
        if isinstance(module, nn.GroupNorm):  # statistics [N, G]
            grouped = x.reshape(x.shape[0], module.num_groups, -1)
            centred = grouped - self.mean.unsqueeze(-1)
            return centred.mul_(self.rstd.unsqueeze(-1)).reshape(x.shape)
        if isinstance(module, _BatchNorm):  # statistics [C], over the batch
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return (x - self.mean.view(shape)).mul_(self.rstd.view(shape))
        return (x - self.mean).mul_(self.rstd)  # (LayerNorm: statistics [..., 1, …, 1])


def _statistics(node: torch.autograd.graph.Node) -> _Statistics | None:
    if type(node).__name__ not in _STATISTICS_NODES:
        return None
    saved: Any = node
    try:
        mean, rstd = saved._saved_result1, saved._saved_result2
    except RuntimeError:  # (already freed: a graph run backward through)
        return None
    if mean.numel() == 0:  # (a batch norm in eval mode: its running statistics, not saved here)
        return None
    # detached: a saved output comes back with the node as its grad_fn (GroupNorm's statistics
    # do), and the record holding it is in that node's metadata, a cycle through C++ that no
    # garbage collection breaks: every step's graph would stay alive
    return _Statistics(mean.detach(), rstd.detach())


@register_rule(*_NORMS, *_LLAMA_NORMS, _T5_NORM)
class NormAffineRule(LayerRule):
    grouped_samples = True  # (the sample dimension is summed per sample in _reduce)
    reads_graph = True  # (X̂, or the statistics that give it, as the forward computed them)

    @classmethod
    def read_graph(
        cls, module: nn.Module, node: torch.autograd.graph.Node
    ) -> Tensor | _Statistics | None:
        """What spares the rule its recompute of ``X̂``: transformers' weight-only RMS norms
        and torch's ``RMSNorm`` end their forward with ``γ ⊙ X̂``, whose autograd node holds
        ``X̂`` exactly as the forward computed it; ``LayerNorm``'s and ``GroupNorm``'s fused
        kernels save each group's ``μ`` and ``1/σ`` (:class:`_Statistics`), and a
        ``BatchNorm``'s in training mode (the batch's). Nothing for a ``BatchNorm`` in eval mode
        (one operation recomputes it from the running statistics), or where the node is another
        (a compiled forward, cuDNN's batch norm)."""
        if isinstance(module, (nn.LayerNorm, nn.GroupNorm, _BatchNorm)):
            return _statistics(node)
        if _transformers_norm(module) is not None or type(module).__name__ == "RMSNorm":
            return _multiplied_by(node, cast(_WeightOnlyRMSNorm, module).weight)
        return None

    @classmethod
    def applies(cls, call: Call) -> bool:
        args, kwargs = call.record.args, call.record.kwargs
        if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
            return False
        if not cls.differentiates_attributes(call, "weight", "bias"):
            return False
        x = args[0]
        if isinstance(call.module, (nn.GroupNorm, _BatchNorm)) and x.dim() < 2:
            return False
        return call.batch_dim is None or call.batch_dim not in _channel_dims(call.module, x)

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        x = call.record.args[0].detach()
        if _transformers_norm(call.module) is None:
            x = full_precision(x)  # (transformers' norms fix their own precision)
        read = call.record.graph_read
        if isinstance(read, Tensor) and read.shape == x.shape:  # (read detached)
            self.normalised = full_precision(read)
        elif isinstance(read, _Statistics):  # (x and the statistics are detached: no graph)
            self.normalised = read.normalised(x, call.module)
        else:
            with torch.no_grad():
                self.normalised = full_precision(_normalised(call.module, x))
        self.channels = _channel_dims(call.module, x)

    def _reduce(self, product: Tensor, leading: int) -> Tensor:
        """Sum ``product`` (``leading`` extra dims, then a module tensor) over every dimension but
        the leading ones, the sample dimension and the channel dimensions; return ``[..., b, C]``.
        """
        call = self.call
        keep = [leading + c for c in self.channels]
        sample = None if call.batch_dim is None else leading + call.batch_dim
        if sample is not None:
            keep = [sample, *keep]
        order = list(range(leading)) + keep
        rest = [d for d in range(product.dim()) if d not in order]
        if order == sorted(order):  # the kept dimensions in their order: no permutation
            reduced = product.sum(dim=rest) if rest else product
        else:
            reduced = product.permute(*order, *rest)
            if rest:  # (an empty dim list would sum over everything)
                reduced = reduced.sum(dim=list(range(len(order), product.dim())))
        if sample is not None and call.group > 1:  # b·k entries, k per sample: sum each k
            reduced = reduced.unflatten(leading, (call.b, call.group)).sum(leading + 1)
        if sample is None:
            reduced = reduced.unsqueeze(leading)
        if reduced.dim() == leading + 2:  # (one channel dimension: the shape it returns)
            return reduced
        return reduced.reshape(*reduced.shape[: leading + 1], -1)

    def _is_weight(self, p: Tensor) -> bool:
        return p is self.call.module.weight

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        call = self.call
        grads = call.grad(0)  # [T, *Y]
        rows = []
        for p in params:
            product = grads * self.normalised if self._is_weight(p) else grads
            reduced = self._reduce(product, 1)  # [T, b, C]
            if call.T > 1:
                reduced = reduced.transpose(0, 1)
            rows.append(reduced.reshape(call.b, call.T, *p.shape))  # (T = 1: the same order)
        return rows

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        dw = self.call.weighted_grad(0, weights)
        grads = []
        for p in params:
            product = dw * self.normalised if self._is_weight(p) else dw
            grads.append(self._reduce(product, 0).sum(0).view_as(p))
        return grads
