r"""``nn.MultiheadAttention``: its input and output projections as Linear-like products.

The module's parameters are the input projection (``in_proj_weight`` ``[3E, E]``, or separate
``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when the key/value widths differ, and
``in_proj_bias`` ``[3E]``) and its ``out_proj`` child's weight and bias. Every one of them enters
the call through a product ``Y_c = X_c W_cᵀ + β_c`` of ``F.linear`` (``c`` ranging over the
projections of the query, key, value, or their packed forms, and the output projection), with
``W_c`` and ``β_c`` a block of rows of one parameter. So the rows of loss ``(i, k)`` are

.. math::  ∂ℓ_{ik}/∂W_c = Σ_s D^c_{k,is} x^c_{isᵀ}, \qquad ∂ℓ_{ik}/∂β_c = Σ_s D^c_{k,is},

with ``D^c = ∂ℓ/∂Y_c`` the gradient of the projection's output, and the Gramian is the sum over
``c`` of the Linear kernel contraction of ``(x^c, D^c)`` (the blocks of a parameter are disjoint
rows, so their Gram matrices add).

**Where ``D^c`` comes from.** The projections' outputs are not outputs of the call, so the rule
re-runs the call once, exactly as it was made (same inputs, same masks, same flags, and the
generators restored to their state before the recorded call, so attention dropout draws the
same mask): ``module.forward`` runs, and at ``F.multi_head_attention_forward`` a copy of that
function takes over whose ``F.linear`` returns its product as a fresh leaf that requires grad
(``no_grad`` inside: the same values). One backward of the re-run's attention core with the
call's output gradients (``T`` rows, batched) then gives every ``D^c``; with ``batch_dim`` the
sample-``i`` slices are the per-sample gradients, since attention mixes positions within a
sample only. Cost: one forward of the attention core and ``T`` of its backward passes (one for
per-sample losses), plus the kernel products; the generic rule instead takes ``b·T``
vector-Jacobian products when dropout is active, and keeps ``b·T`` copies of the parameters.

Calls the rule does not take (they go through the generic rule): ``add_bias_kv`` (its
``bias_k``/``bias_v`` are concatenated, not projected), a per-sample call on an unbatched
(2-D) input, a call recorded on an output expanded along the batch. The engine's first-step
check (:mod:`jdoptim.autogram._certify`) compares the rule's ``Jᵀv`` with autograd's, as for
every rule.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ...linalg.vmap_fallback import batched_vjp
from ._base import LayerRule, register_rule
from ._call import Call, full_precision
from ._contraction import bias_rows, linear_rows, weight_and_bias_gramian

_PROJECTION_NAMES = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


@dataclass
class _Product:
    """One ``F.linear`` of the re-run: input ``x`` ``[..., d]``, the output leaf ``y``
    ``[..., o]``, and the parameters (with their first row) its weight and bias are blocks of."""

    x: Tensor
    y: Tensor
    weight: Tensor
    weight_row: int
    bias: Tensor | None
    bias_row: int


def _block_of(tensor: Tensor, candidates: list[Tensor]) -> tuple[Tensor, int]:
    """The parameter among ``candidates`` whose rows ``tensor`` is (itself or a view of a block
    of its rows), and the first of those rows."""
    for p in candidates:
        if tensor is p:
            return p, 0
        if tensor._base is p and tensor.stride() == p.stride() and tensor.shape[1:] == p.shape[1:]:
            offset = tensor.storage_offset() - p.storage_offset()
            if offset % p.stride(0) == 0:
                return p, offset // p.stride(0)
    raise RuntimeError(
        "MultiheadAttention rule: a projection inside F.multi_head_attention_forward uses a "
        "weight that is no block of the module's parameters (an unexpected torch version?)."
    )


class _Recorder:
    def __init__(self, candidates: list[Tensor]) -> None:
        self.candidates = candidates
        self.products: list[_Product] = []

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x Wᵀ + β`` with a leaf that requires grad where its output gradient is read: the
        output itself for an input without a graph (the in-projections), else an added zero
        (the output projection, whose input carries the in-projections' graph)."""
        w, w_row = _block_of(weight, self.candidates)
        b, b_row = (None, 0) if bias is None else _block_of(bias, self.candidates)
        if x.requires_grad:
            y = torch._C._nn.linear(x, weight.detach(), None if bias is None else bias.detach())
            leaf = torch.zeros_like(y, requires_grad=True)
            out = y + leaf
        else:
            with torch.no_grad():
                leaf = out = torch._C._nn.linear(x, weight, bias)
            leaf.requires_grad_()
        self.products.append(_Product(x.detach(), leaf, w, w_row, b, b_row))
        return out


_LOCAL = threading.local()


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return _LOCAL.recorder.linear(x, weight, bias)


def _copy(function: Any, namespace: dict[str, Any]) -> Any:
    copy = types.FunctionType(
        function.__code__, namespace, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


def _build_forward() -> Any:
    """A copy of ``F.multi_head_attention_forward`` (and of the in-projection helpers it calls)
    whose ``linear`` is :func:`_linear` and which never dispatches ``__torch_function__``."""
    namespace = dict(vars(F))
    namespace["linear"] = _linear
    namespace["has_torch_function"] = lambda *args: False
    for name in ("_in_projection_packed", "_in_projection"):
        namespace[name] = _copy(getattr(F, name), namespace)
    return _copy(F.multi_head_attention_forward, namespace)


_FORWARD: list[Any] = []


class _SwapAttention(TorchFunctionMode):
    """Runs :func:`_build_forward`'s copy where the module calls
    ``F.multi_head_attention_forward``; every other function as it is."""

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            if not _FORWARD:
                _FORWARD.append(_build_forward())
            return _FORWARD[0](*args, **kwargs)
        return func(*args, **kwargs)


def _detach_keeping_identity(tree: Any) -> Any:
    """Detached tensors, one per distinct input (the module takes its packed self-attention
    path only when query, key and value are the same tensor)."""
    seen: dict[int, Tensor] = {}

    def detach(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if id(t) not in seen:
            seen[id(t)] = t.detach()
        return seen[id(t)]

    return tree_map(detach, tree)


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(LayerRule[nn.MultiheadAttention]):
    """``nn.MultiheadAttention`` by its projections (see the module docs)."""

    #: the rule re-runs the call: the engine records the generators' state before it
    replays = True

    @classmethod
    def applies(cls, call: Call) -> bool:
        module = cls.module_of(call)
        if getattr(module, "bias_k", None) is not None or call.record.unexpanded is not None:
            return False
        handled = [getattr(module, n, None) for n in _PROJECTION_NAMES]
        handled += [module.in_proj_bias, module.out_proj.weight, module.out_proj.bias]
        if any(all(p is not h for h in handled) for p in call.params):
            return False
        args, kwargs = call.record.args, call.record.kwargs
        query = args[0] if args else kwargs.get("query")
        if not isinstance(query, Tensor):
            return False
        return call.batch_dim is None or query.dim() == 3

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        self._products: list[tuple[_Product, Tensor, Tensor]] | None = None

    def _candidates(self) -> list[Tensor]:
        module = self.module
        found = [getattr(module, n, None) for n in _PROJECTION_NAMES]
        found += [module.in_proj_bias, module.out_proj.weight, module.out_proj.bias]
        return [p for p in found if isinstance(p, Tensor)]

    def _rerun(self) -> tuple[_Recorder, tuple[Tensor, ...]]:
        """The call again, its projections recorded; its tapped outputs."""
        call = self.call
        record = call.record
        recorder = _Recorder(self._candidates())
        args, kwargs = _detach_keeping_identity((record.args, record.kwargs))
        rng = record.rng
        amp = record.autocast
        autocast = torch.autocast(amp[0], dtype=amp[1]) if amp else contextlib.nullcontext()
        _LOCAL.recorder = recorder
        try:
            with torch.random.fork_rng(devices=rng.devices() if rng else []):
                if rng is not None:
                    rng.restore()
                with torch.enable_grad(), autocast, _SwapAttention():
                    out = call.module.forward(*args, **kwargs)
        finally:
            _LOCAL.recorder = None
        leaves = [out] if isinstance(out, Tensor) else tree_flatten(out)[0]
        return recorder, tuple(leaves[t.leaf_index] for t in record.tapped)

    def _projection_grads(self, recorder: _Recorder, outputs: tuple[Tensor, ...]) -> list[Tensor]:
        """``D^c`` ``[T, *y_c.shape]`` of every recorded product, from the call's ``D``."""
        call = self.call
        reached = [i for i, g in enumerate(call.grads) if g is not None]
        leaves = [p.y for p in recorder.products]
        if not reached:
            return [torch.zeros((call.T, *y.shape), dtype=y.dtype, device=y.device) for y in leaves]
        outs = [outputs[i] for i in reached]
        cotangents = [call.grad(i).to(outputs[i].dtype) for i in reached]
        with torch.enable_grad():
            grads = batched_vjp(outs, leaves, cotangents, retain_graph=False)
        return [
            torch.zeros((call.T, *y.shape), dtype=y.dtype, device=y.device) if g is None else g
            for g, y in zip(grads, leaves)
        ]

    def products(self) -> list[tuple[_Product, Tensor, Tensor]]:
        """Each product with its inputs ``[b, S, d]`` and output gradients ``[T, b, S, o]``."""
        if self._products is None:
            recorder, outputs = self._rerun()
            _check_covered(self.call.params, recorder.products)
            grads = self._projection_grads(recorder, outputs)
            self._products = [
                (p, *self._samples_first(p, g)) for p, g in zip(recorder.products, grads)
            ]
        return self._products

    def _samples_first(self, product: _Product, grad: Tensor) -> tuple[Tensor, Tensor]:
        """Inside ``F.multi_head_attention_forward`` tensors are ``[L, N, ·]`` (the output
        projection's input ``[L·N, ·]``, rows ordered ``(l, n)``), the samples on dimension 1."""
        call = self.call
        x, d, o = full_precision(product.x), full_precision(grad), grad.shape[-1]
        if call.batch_dim is None:
            return x.reshape(1, -1, x.shape[-1]), d.reshape(call.T, 1, -1, o)
        b = call.b
        if x.shape[-2] != b if x.dim() == 3 else x.dim() != 2 or x.shape[0] % b:
            raise RuntimeError(
                f"MultiheadAttention rule: a projection's input {tuple(x.shape)} does not index "
                f"the {b} samples on its second dimension."
            )
        x = x.reshape(-1, b, x.shape[-1]).transpose(0, 1)
        d = d.reshape(call.T, -1, b, o).transpose(1, 2)
        return x, d

    def gramian(self, params: list[Tensor]) -> Tensor:
        blocks: dict[int, list[tuple[int, int]]] = {}
        total: Tensor | None = None
        for product, inputs, grads in self.products():
            pair = (product.weight, product.bias)
            used = [t for t in pair if t is not None and _among(t, params)]
            if not used:
                continue
            o = grads.shape[-1]
            for t, row in ((product.weight, product.weight_row), (product.bias, product.bias_row)):
                if _among(t, params):
                    blocks.setdefault(id(t), []).append((row, row + o))
            term = weight_and_bias_gramian(inputs, grads, used, product.weight)
            total = term if total is None else total + term
        if not all(_disjoint(spans) for spans in blocks.values()):
            return super().gramian(params)  # blocks of rows used twice: from the rows
        if total is None:
            b, n = self.call.b, self.call.T
            return torch.zeros(b, n, b, n, dtype=params[0].dtype, device=params[0].device)
        return total

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        call = self.call
        rows = [
            full_precision(torch.zeros((call.b, call.T, *p.shape), dtype=p.dtype, device=p.device))
            for p in params
        ]
        for product, inputs, grads in self.products():
            o = grads.shape[-1]
            for index, p in enumerate(params):
                if p is product.weight:
                    block = linear_rows(inputs, grads)
                    r = product.weight_row
                    rows[index] = _add_rows(rows[index], block, r, o)
                if p is product.bias:
                    rows[index] = _add_rows(rows[index], bias_rows(grads), product.bias_row, o)
        return rows

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        out: list[Tensor | None] = [None] * len(params)
        for product, inputs, grads in self.products():
            o, d = grads.shape[-1], inputs.shape[-1]
            dw = torch.einsum("kiso,ik->iso", grads, weights.to(grads.dtype)).reshape(-1, o)
            for index, p in enumerate(params):
                if p is product.weight:
                    part, row = dw.T @ inputs.reshape(-1, d), product.weight_row
                elif p is product.bias:
                    part, row = dw.sum(0), product.bias_row
                else:
                    continue
                if out[index] is None:
                    out[index] = torch.zeros(p.shape, dtype=part.dtype, device=part.device)
                out[index][row : row + o] += part  # type: ignore[index]
        return [torch.zeros_like(p) if g is None else g for g, p in zip(out, params)]


def _check_covered(params: list[Tensor], products: list[_Product]) -> None:
    """Every differentiated parameter entered the call through a recorded product (else the
    rows would silently miss it: a torch version whose attention projects otherwise)."""
    seen = {id(t) for p in products for t in (p.weight, p.bias) if t is not None}
    if any(id(p) not in seen for p in params):
        raise RuntimeError(
            "MultiheadAttention rule: a parameter of the call was used by no F.linear of "
            "F.multi_head_attention_forward (an unexpected torch version?)."
        )


def _among(t: Tensor | None, params: list[Tensor]) -> bool:
    return t is not None and any(t is p for p in params)


def _disjoint(spans: list[tuple[int, int]]) -> bool:
    ordered = sorted(spans)
    return all(a[1] <= b[0] for a, b in itertools.pairwise(ordered))


def _add_rows(rows: Tensor, block: Tensor, start: int, count: int) -> Tensor:
    """``rows[:, :, start:start+count] += block`` (``block`` ``[b, T, count, ...]``)."""
    rows = rows.to(block.dtype) if rows.dtype != block.dtype else rows
    rows[:, :, start : start + count] += block
    return rows
