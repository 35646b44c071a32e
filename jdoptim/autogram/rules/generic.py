r"""The fallback for every module without a rule: ``torch.func`` on a re-run of the call.

The call is re-run as a function of the parameters being differentiated,
``f(θ) = functional_call(module, θ, args)`` (inputs detached, buffers cloned so that a re-run
never updates running statistics), and its vector-Jacobian product gives the rows:

* without ``batch_dim``: ``vmap`` over the ``T`` output gradients of ``vjp(f)``: ``T`` rows
  ``[T, *θ]`` for about the cost of ``T`` backward passes of the module;
* with ``batch_dim``: per sample, ``vjp`` of the call on that sample alone (its batched inputs
  sliced, kept with a batch of one), ``vmap``-ed over samples and rows: ``[b, T, *θ]``.
  Where each input and output indexes the samples: :mod:`jdoptim.autogram._sample_dims`.

Where ``vmap`` cannot run (an operator without a batching rule) it loops instead. The rows are
kept for the update (``Σ w_{ik} rows_{ik}``), so the call is re-run once per step. Cost: one
forward of the module plus ``T`` (resp. ``b·T``) vector-Jacobian products, and ``b T n_θ`` memory.
A re-run is exact for deterministic modules: a module with active dropout inside it must give a
rule or run with dropout off.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .._sample_dims import input_sample_dims
from ._base import LayerRule
from ._call import Call


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class GenericRule(LayerRule):
    def __init__(self, call: Call) -> None:
        super().__init__(call)
        names = {}
        for name, param in call.module.named_parameters():
            names.setdefault(param, name)
        self.names = names
        self._rows: dict[str, Tensor] | None = None

    def _outputs(self, primals: dict[str, Tensor], buffers: dict[str, Tensor], args, kwargs):
        out = functional_call(self.call.module, {**primals, **buffers}, args, kwargs)
        leaves = [out] if isinstance(out, Tensor) else tree_flatten(out)[0]
        return tuple(leaves[t.leaf_index] for t in self.call.record.tapped)

    def _all_rows(self) -> dict[str, Tensor]:
        if self._rows is None:
            # The engine runs rules under no_grad; the re-run must still take the module's
            # training code path (an LSTM's inference kernel, for one, cannot be differentiated).
            with torch.enable_grad():
                self._rows = self._compute_rows()
        return self._rows

    def _compute_rows(self) -> dict[str, Tensor]:
        call = self.call
        primals = {self.names[p]: p.detach() for p in call.params}
        buffers = {n: b.clone() for n, b in call.module.named_buffers()}
        args, kwargs = _detach(call.record.args), _detach(call.record.kwargs)
        grads = tuple(call.grad(i) for i in range(len(call.record.tapped)))
        if call.batch_dim is None:
            rows = self._task_rows(primals, buffers, args, kwargs, grads)
            return {n: r.unsqueeze(0) for n, r in rows.items()}
        return self._sample_rows(primals, buffers, args, kwargs, grads)

    def _task_rows(self, primals, buffers, args, kwargs, grads) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: self._outputs(p, buffers, args, kwargs), primals)
        try:
            return vmap(pullback)(grads)[0]
        except (RuntimeError, NotImplementedError):
            rows = [pullback(tuple(g[k] for g in grads))[0] for k in range(self.call.T)]
            return {n: torch.stack([r[n] for r in rows]) for n in primals}

    def _sample_rows(self, primals, buffers, args, kwargs, grads) -> dict[str, Tensor]:
        call = self.call
        assert call.batch_dim is not None
        flat, spec = tree_flatten((args, kwargs))
        dims = input_sample_dims(call.module, flat, call.batch_dim, call.b)
        out_dims = [call.out_dim(i) for i in range(len(grads))]

        def one(flat_one: list[Any], grads_one: tuple[Tensor, ...]) -> dict[str, Tensor]:
            restored = [t.unsqueeze(d) if d is not None else t for t, d in zip(flat_one, dims)]
            args_one, kwargs_one = tree_unflatten(restored, spec)
            _, pullback = vjp(lambda p: self._outputs(p, buffers, args_one, kwargs_one), primals)
            cotangents = tuple(g.unsqueeze(d + 1) for g, d in zip(grads_one, out_dims))
            return vmap(pullback)(cotangents)[0]

        try:
            in_dims = (dims, tuple(d + 1 for d in out_dims))
            return vmap(one, in_dims=in_dims)(flat, grads)
        except (RuntimeError, NotImplementedError):
            return self._sample_rows_by_loop(primals, buffers, flat, spec, dims, out_dims, grads)

    def _sample_rows_by_loop(self, primals, buffers, flat, spec, dims, out_dims, grads):
        call = self.call
        per_sample = []
        for i in range(call.b):
            sliced = [t.narrow(d, i, 1) if d is not None else t for t, d in zip(flat, dims)]
            args_one, kwargs_one = tree_unflatten(sliced, spec)
            _, pullback = vjp(
                lambda p, a=args_one, k=kwargs_one: self._outputs(p, buffers, a, k), primals
            )
            rows = [
                pullback(tuple(g[k].narrow(d, i, 1) for g, d in zip(grads, out_dims)))[0]
                for k in range(call.T)
            ]
            per_sample.append({n: torch.stack([r[n] for r in rows]) for n in primals})
        return {n: torch.stack([s[n] for s in per_sample]) for n in primals}

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        rows = self._all_rows()
        return [rows[self.names[p]] for p in params]

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        rows = self._all_rows()
        return [
            torch.tensordot(weights.to(r.dtype), r, dims=2)
            for r in (rows[self.names[p]] for p in params)
        ]
