"""Per-layer Gramian rules, registered by module type, with a ``torch.func`` fallback; the public
rule kit for adding a rule for your own layer type.

=========================================  =============================================
module                                      rule
=========================================  =============================================
``Linear``, transformers' ``Conv1D``        ``(XXᵀ)⊙(DDᵀ)`` / kernel contraction or rows, by cost
``Conv1d``, ``Conv2d`` (any groups,         im2col, then as ``Linear`` (grouped: one batched
any padding)                                product over the groups)
``Embedding`` (with ``padding_idx``)        one-hot kernel contraction
``EmbeddingBag`` (``"sum"``, ``"mean"``;    its bags' entries as an ``Embedding``'s positions
offsets, per-sample weights)
``LayerNorm``, ``RMSNorm``, ``GroupNorm``,  affine rows from the recomputed normalised input
``BatchNorm*``, transformers'
``LlamaRMSNorm`` (Mistral, Qwen2),
``T5LayerNorm``
``PReLU``                                   rows ``Σ D ⊙ min(0, x)`` per sample and channel
``MultiheadAttention``                      its in/out projections as ``Linear`` products,
                                            from one re-run of the call (same dropout draws)
transformers' ``ViTEmbeddings``             the patch projection as ``Linear`` on the
                                            patches, class token and position embedding rows
anything else                               :class:`GenericRule` (``torch.func.vjp`` + ``vmap``
                                            on a re-run of the call)
=========================================  =============================================

``nn.MultiheadAttention`` applies its projections inside ``F.multi_head_attention_forward``,
so no output of the call is theirs: its rule (:mod:`.attention`) re-runs the call once with the
recorded call's random draws, reads every projection's output gradient from one backward of the
attention core, and takes the Linear kernel products (``add_bias_kv`` goes through the generic
rule).

**The contract.** A rule differentiates one call of its module type from what one backward
pass gives: the call's recorded inputs and the output gradients ``D[k] = ∂(Σᵢ ℓ_{ik})/∂Y`` (rows
``[b, T]``: ``b`` samples times ``T`` losses per sample; see :class:`Call`). It is a
:class:`LayerRule` subclass that provides, for a list ``params`` of its module's parameters:

* **rows** (:meth:`LayerRule.jacobians`): ``∂ℓ_{ik}/∂p`` as ``[b, T, *p.shape]``, used where a
  parameter is shared by several calls (its rows are summed over the calls first);
* **factorisation** (:meth:`LayerRule.factorisation`): its Gramian contribution
  ``G[i,k,j,l] = Σ_p ⟨∂ℓ_{ik}/∂p, ∂ℓ_{jl}/∂p⟩`` as a sum of typed terms. A
  :class:`KernelTerm` (inputs ``A``, output gradients ``D``: ``Σ_{s,r} ⟨a_{is}, a_{jr}⟩
  ⟨D_{k,is}, D_{l,jr}⟩``), an :class:`IndexTerm` (token indices and ``D``: the same with
  one-hot inputs) or a :class:`RowsTerm` (explicit rows, the default). The local engine sums
  the terms' Gramians (:meth:`LayerRule.gramian`); the distributed engine gathers the terms'
  per-sample factors from every process and contracts them with the same code, so a rule's
  factorisation is its distributed exchange too (:mod:`jdoptim.distributed.engine`);
* **update** (:meth:`LayerRule.weighted`): ``Σ_{i,k} w_{ik} ∂ℓ_{ik}/∂p`` from the same output
  gradients (the call's vector-Jacobian product with ``Σ_k w_{·k} D[k]``), so a step needs no
  second backward;
* optionally :meth:`LayerRule.applies`: whether a call has the form the rule handles (others go
  through :class:`GenericRule`);
* optionally :meth:`LayerRule.read_graph` (with :attr:`LayerRule.reads_graph`): a tensor the
  call's autograd graph saved and the rule would otherwise recompute (the normalised input a
  weight-only RMS norm multiplied by its weight), taken before the backward pass frees it;
* optionally :meth:`LayerRule.sliced_jacobians`: the rows of a slice ``p[a:e]`` of a parameter
  alone, so that a parameter tied into several calls whose ``b T`` rows exceed the step's
  budget (a vocabulary shared by an embedding and a head) has its Gramian summed over slices
  (``Linear``-like layers and ``Embedding`` have it; without it the whole rows are formed).

The engine checks each rule's update against autograd on the first step of each graph
structure (:mod:`jdoptim.autogram._certify`) and gives a module whose update differs autograd's
rows, with a warning. That check does not see the factorisation: a rule's terms must give the
Gram matrix of its rows, which its tests show against an explicit Jacobian (as
``tests/autogram/test_rule_kit.py`` does for a rule written with the kit).

**The rule kit** (public names of this package). :func:`register_rule` maps module classes or,
lazily, qualified class names (``"package.module.ClassName"``, matched without importing the
package) to a rule. For a layer that applies a weight matrix to the last dimension of its
input, subclass :class:`LinearLikeRule` and set ``weight_layout`` (``"out_in"`` as
``nn.Linear``, ``"in_out"`` as transformers' ``Conv1D``): the rows, the kernel factorisation
(hence the distributed factor exchange) and the update come from the base. Any other layer
subclasses :class:`LayerRule` with the contraction helpers (:func:`linear_rows`,
:func:`bias_rows`, :func:`linear_kernel`, :func:`gramian_from_kernel`, :func:`linear_gramian`,
:func:`rows_gramian`, :func:`full_precision`). See ``examples/custom_rule.py``.
A rule parametrised by its module class, ``class MyRule(LayerRule[MyLayer])``, reads the module
as ``self.module`` (or ``cls.module_of(call)`` in :meth:`~LayerRule.applies`) with that class's
attribute types, for the type checker (``mypy jdoptim`` runs in CI).
"""

from . import attention, conv, embedding, embedding_bag, linear, norm, prelu, vit  # noqa: F401
from ._base import LayerRule, qualified_name, register_rule, registered_rule
from ._call import Call, full_precision
from ._contraction import (
    bias_rows,
    gramian_from_kernel,
    linear_gramian,
    linear_kernel,
    linear_rows,
    rows_gramian,
)
from ._terms import GramianTerm, IndexTerm, KernelTerm, RowsTerm
from .generic import GenericRule
from .linear import LinearLikeRule, PositionwiseLinearRule

__all__ = [
    "Call",
    "GenericRule",
    "GramianTerm",
    "IndexTerm",
    "KernelTerm",
    "LayerRule",
    "LinearLikeRule",
    "PositionwiseLinearRule",
    "RowsTerm",
    "bias_rows",
    "full_precision",
    "gramian_from_kernel",
    "linear_gramian",
    "linear_kernel",
    "linear_rows",
    "make_rule",
    "qualified_name",
    "register_rule",
    "registered_rule",
    "rows_gramian",
]


def make_rule(call: Call) -> LayerRule:
    """The registered rule for the call's module if it applies to this call (and, for a call
    whose samples are folded with another dimension, handles those: ``grouped_samples``; and,
    for a sample-shared call expanded along the batch, sees its inputs expanded too), else the
    generic."""
    rule = registered_rule(call.module)
    if (
        rule is not None
        and (call.group == 1 or rule.grouped_samples)
        and call.groups is None
        and call.record.inputs_expanded
        and rule.applies(call)
    ):
        return rule(call)
    return GenericRule(call)
