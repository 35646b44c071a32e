r"""Layers linear in their weight at every position: ``Y = X W + β`` on the last dimension.

:class:`PositionwiseLinearRule` is the shared core (``Linear``, transformers' ``Conv1D``, and
``Conv`` after im2col): a layer ``Y_s = W a_s (+ β)`` at every position ``s`` of a sample.
Its Gramian factors as one :class:`~._terms.KernelTerm` of the inputs and output gradients
(``(AAᵀ) ⊙ (DDᵀ)`` for one position per sample, a kernel contraction or explicit rows otherwise,
by cost), which the distributed engine exchanges as it is; its update is one matrix product
``D_wᵀ X`` with ``D_w = Σ_k w_{·k} D[k]``.

:class:`LinearLikeRule` is the public base for a layer that applies a weight matrix to the last
dimension of its one input, ``Y = X Wᵀ + β`` (``weight_layout = "out_in"``, the weight stored
``[out, in]`` as in ``nn.Linear``) or ``Y = X W + β`` (``"in_out"``, stored ``[in, out]`` as in
transformers' ``Conv1D``). A new such layer is a subclass that sets the layout (and the names
of its weight and bias attributes if they differ) and registers itself (examples/custom_rule.py).
"""

from __future__ import annotations

from abc import abstractmethod
from functools import cached_property
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from ._base import LayerRule, ModuleT, register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows, takes_contraction
from ._terms import GramianTerm, KernelTerm


class PositionwiseLinearRule(LayerRule[ModuleT]):
    """A layer ``Y_s = W a_s (+ β)`` at every position ``s``: subclasses give ``inputs``
    (``a``, ``[b, S, d]``) and ``grads`` (``D``, ``[T, b, S, o]``), and :meth:`weight_of`."""

    @property
    @abstractmethod
    def inputs(self) -> Tensor:
        """``a``: the inputs at every position, ``[b, S, d]``."""

    @property
    @abstractmethod
    def grads(self) -> Tensor:
        """``D``: the output gradients at every position, ``[T, b, S, o]``."""

    @abstractmethod
    def weight_of(self) -> Tensor:
        """The weight ``W`` (the other differentiated parameter, if any, is the bias)."""

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        """One :class:`~._terms.KernelTerm` of ``(a, D)`` for the weight and the bias."""
        weight = self.weight_of()
        has_weight = any(p is weight for p in params)
        has_bias = any(p is not weight for p in params)
        return [KernelTerm(self.inputs, self.grads, has_weight, has_bias)]


class LinearLikeRule(PositionwiseLinearRule[nn.Module]):
    """Rule for a layer computing ``Y = X Wᵀ + β`` (``weight_layout = "out_in"``) or
    ``Y = X W + β`` (``"in_out"``) on the last dimension of its one tensor input ``X``.

    Subclass it, set ``weight_layout`` (and ``weight_name``/``bias_name`` if the module stores
    them under other attributes; a missing or ``None`` bias is fine) and register the subclass
    with :func:`register_rule`. The rule applies to calls ``module(x)`` whose differentiated
    parameters are only the weight and the bias; other calls go through the generic rule.

    The per-sample case with one position per sample (``batch_dim=0``, one loss per sample, a
    ``[b, d]`` input) works on the 2-D ``A`` (``b × d``) and ``D`` (``b × o``) directly:
    ``G = (A Aᵀ + 1) ⊙ (D Dᵀ)`` and ``∇W = (w ⊙ D)ᵀ A``.
    """

    weight_layout: ClassVar[Literal["out_in", "in_out"]] = "out_in"
    weight_name: ClassVar[str] = "weight"
    bias_name: ClassVar[str] = "bias"
    grouped_samples = True  # positions folded into the sample dimension are more positions

    @classmethod
    def applies(cls, call: Call) -> bool:
        x = call.record.sole_input
        if x is None or x.dim() < 1:
            return False
        weight = call.module._parameters.get(cls.weight_name)  # (no Module.__getattr__)
        if weight is None:
            weight = getattr(call.module, cls.weight_name, None)
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            return False
        if not cls.differentiates_attributes(call, cls.weight_name, cls.bias_name):
            return False
        return call.batch_dim is None or call.batch_dim < x.dim() - 1

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        self.x = full_precision(call.record.args[0])  # the engine runs rules under no_grad
        #: ``(A, D)`` as ``b × d`` and ``b × o`` in the per-sample ``S = 1`` case, else ``None``.
        self.rows_2d: tuple[Tensor, Tensor] | None = None
        if call.T == 1 and call.batch_dim == 0 and self.x.dim() == 2 and call.group == 1:
            grad = call.grads[0]
            if grad is not None and not call.stacked:
                self.rows_2d = (self.x, full_precision(grad))
            else:
                self.rows_2d = (self.x, call.grad(0).reshape(call.b, -1))

    def weight_of(self) -> Tensor:
        return getattr(self.call.module, self.weight_name)

    @cached_property
    def inputs(self) -> Tensor:
        return self.call.samples_first(self.x).reshape(self.call.b, -1, self.x.shape[-1])

    @cached_property
    def grads(self) -> Tensor:
        out = self.call.record.tapped[0].shape[-1]
        return self.call.grad_samples_first(0, -1, out)

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        """The kernel term, on the 2-D ``A``, ``D`` when there is one position and one loss
        per sample."""
        weight = self.weight_of()
        if self.rows_2d is not None and any(p is weight for p in params):
            inputs, grads = self.rows_2d
            return [KernelTerm(inputs, grads, weight=True, bias=len(params) > 1)]
        return super().factorisation(params)

    def forms_rows(self, params: list[Tensor]) -> bool:
        """As the kernel term of :meth:`factorisation` decides (the bias alone: its rows; the
        one-position layout: never; else by :func:`~._contraction.takes_contraction`), read
        from the shapes without making the term (this is asked of every call of every step)."""
        weight = self.weight_of()
        if not any(p is weight for p in params):
            return True
        if self.rows_2d is not None:
            return False
        t, b, s, o = self.grads.shape
        return not takes_contraction(b, s, t, self.x.shape[-1] + (len(params) > 1), o)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        weight = self.weight_of()
        rows = []
        for p in params:
            if p is weight:
                rows.append(self._weight_rows())
            else:
                rows.append(bias_rows(self.grads))
        return rows

    def _weight_rows(self, part: slice = slice(None)) -> Tensor:
        """The weight's rows ``[b, T, *weight.shape]`` (of its rows ``part`` alone: output
        features for ``[out, in]``, input features for ``[in, out]``, the same product on that
        slice of ``D`` or ``X``), contiguous (``[in, out]`` rows taken as ``Xᵀ D`` directly,
        not as a transposed ``Dᵀ X``, whose copy into the held rows would be a transposing one:
        GPT-2 6×256 per-sample 1.29–1.31× → 1.23–1.24× a plain step)."""
        whole = part == slice(None)  # (no slicing operation on the step's usual path)
        if self.weight_layout == "out_in":
            grads = self.grads if whole else self.grads[..., part]
            return linear_rows(self.inputs, grads)  # [b, T, o, d]
        grads = self.grads  # [T, b, S, o]
        inputs = (self.inputs if whole else self.inputs[..., part]).transpose(1, 2)  # [b, d, S]
        if grads.shape[0] == 1:
            return torch.bmm(inputs, grads[0]).unsqueeze(1)
        return torch.matmul(inputs.unsqueeze(1), grads.transpose(0, 1))  # [b, T, d, o]

    def sliced_jacobians(self, param: Tensor, part: slice) -> Tensor | None:
        """The weight's rows for its rows ``part`` (:meth:`_weight_rows`)."""
        if param is not self.weight_of() or self.rows_2d is not None:
            return None
        return self._weight_rows(part)

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        weight = self.weight_of()
        if self.rows_2d is not None:  # weights: [b, 1]
            inputs, grads = self.rows_2d
            dw = grads * weights.to(grads.dtype)
        else:
            dw = self.call.weighted_grad(0, weights)
            dw = dw.reshape(-1, dw.shape[-1])
            inputs = self.x.reshape(-1, self.x.shape[-1])
        out_in = self.weight_layout == "out_in"
        return [
            (dw.T @ inputs if out_in else inputs.T @ dw) if p is weight else dw.sum(0)
            for p in params
        ]


@register_rule(nn.Linear)
class LinearRule(LinearLikeRule):
    """``nn.Linear``: weight ``[out, in]``."""


@register_rule("transformers.pytorch_utils.Conv1D")
class TransformersConv1DRule(LinearLikeRule):
    """transformers' ``Conv1D`` (GPT-2's projections): ``Y = X W + β`` with the weight stored
    ``[in, out]``; recognised by its qualified name, so transformers is never imported here."""

    weight_layout = "in_out"
