"""Per-layer Gramian rules, registered by module type, with a ``torch.func`` fallback; the public
rule kit for adding a rule for your own layer type.

=========================================  =============================================
module                                      rule
=========================================  =============================================
``Linear``, transformers' ``Conv1D``        ``(XXᵀ)⊙(DDᵀ)`` / kernel contraction or rows, by cost
``Conv1d``, ``Conv2d`` (any groups,         im2col, then as ``Linear`` (grouped: one batched
any padding)                                product over the groups)
``Embedding`` (with ``padding_idx``)        one-hot kernel contraction
``LayerNorm``, ``RMSNorm``, ``GroupNorm``,  affine rows from the recomputed normalised input
``BatchNorm*``, transformers'
``LlamaRMSNorm`` (Mistral, Qwen2),
``T5LayerNorm``
anything else (``MultiheadAttention``       :class:`GenericRule` (``torch.func.vjp`` + ``vmap``
included)                                   on a re-run of the call)
=========================================  =============================================

``nn.MultiheadAttention`` holds its input projection as direct parameters used inside
``F.multi_head_attention_forward``; no output of the call is the projection's, so a Linear-like
rule would itself have to re-run the attention to reach the projections' output gradients. It
therefore goes through the generic rule (its out-projection ``Linear`` too, being its child).

**The rule kit.** A rule is a :class:`LayerRule` subclass registered with :func:`register_rule`
for module classes or, lazily, for qualified class names (``"package.module.ClassName"``, matched
without importing the package). It reads the call (:class:`Call`: the recorded inputs, the output
gradients ``D`` laid out ``[T, *output]``, the ``[b, T]`` loss layout) and returns the rows
(``jacobians``), optionally a cheaper ``gramian``, and the weighted update (``weighted``). For a
layer that applies a weight matrix to the last dimension of its input, subclass
:class:`LinearLikeRule` and set its ``weight_layout``. :mod:`._contraction`'s helpers
(:func:`linear_gramian`, :func:`gramian_from_kernel`, :func:`rows_gramian`) give the kernel
contractions. See ``examples/custom_rule.py``.
"""

from . import attention, conv, embedding, linear, norm  # noqa: F401  (registration)
from ._base import LayerRule, qualified_name, register_rule, registered_rule
from ._call import Call
from ._contraction import gramian_from_kernel, linear_gramian, rows_gramian
from .generic import GenericRule
from .linear import LinearLikeRule, PositionwiseLinearRule

__all__ = [
    "Call",
    "GenericRule",
    "LayerRule",
    "LinearLikeRule",
    "PositionwiseLinearRule",
    "gramian_from_kernel",
    "linear_gramian",
    "make_rule",
    "qualified_name",
    "register_rule",
    "registered_rule",
    "rows_gramian",
]


def make_rule(call: Call) -> LayerRule:
    """The registered rule for the call's module if it applies to this call, else the generic."""
    rule = registered_rule(call.module)
    if rule is not None and rule.applies(call):
        return rule(call)
    return GenericRule(call)
