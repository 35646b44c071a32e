"""Per-layer Gramian rules, registered by module type, with a ``torch.func`` fallback.

=====================================  =================================================
module                                  rule
=====================================  =================================================
``Linear``                              ``(XXᵀ)⊙(DDᵀ)`` / kernel contraction or rows, by cost
``Conv1d``, ``Conv2d`` (groups=1)       im2col, then as ``Linear``
``Embedding``                           one-hot kernel contraction
``LayerNorm``, ``RMSNorm``,             affine rows from the recomputed normalised input
``GroupNorm``, ``BatchNorm*``
anything else                           :class:`GenericRule` (``torch.func.vjp`` + ``vmap``)
=====================================  =================================================
"""

from . import conv, embedding, linear, norm  # noqa: F401  (registration)
from ._base import LayerRule, register_rule, registered_rule
from ._call import Call
from .generic import GenericRule

__all__ = ["Call", "GenericRule", "LayerRule", "make_rule", "register_rule"]


def make_rule(call: Call) -> LayerRule:
    """The registered rule for the call's module if it applies to this call, else the generic."""
    rule = registered_rule(call.module)
    if rule is not None and rule.applies(call):
        return rule(call)
    return GenericRule(call)
