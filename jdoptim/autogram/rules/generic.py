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

What makes a re-run the recorded call, exactly:

* **random draws** (dropout in training mode): when the recorded call drew random numbers, its
  record holds the generators' states from before the call
  (:class:`~jdoptim.autogram._records.RandomState`); the re-run restores them inside
  ``torch.random.fork_rng`` (so the user's random stream is left as it was) and draws the same
  masks. Such a re-run is eager, differentiated by ``torch.autograd.grad`` (batched over the
  cotangents), not by ``torch.func.vjp``: under ``torch.func`` transforms, ``dropout`` of a
  non-contiguous tensor and ``scaled_dot_product_attention`` with dropout consume the same
  generator state differently from the eager call, so a transformed re-run draws other masks
  (CvT's stages were 2% off). A per-sample re-run on one sample at a time would draw other
  numbers, so such a call is re-run *whole*, once, and its per-sample rows are the ``b·T``
  vector-Jacobian products of the whole call with the output gradient of one sample each
  (``D[k]`` masked to sample ``i``): exact, ``b`` times the products of the sliced route;
* **side effects**: buffers are cloned (a re-run never updates running statistics), and every
  submodule's attributes are put back after the re-run (a counter incremented in ``forward`` is
  incremented once, by the user's forward);
* **what torch.func cannot run** (an ``autograd.Function`` without ``setup_context``, as
  RecurrentGemma's RG-LRU scan): the re-run is made eagerly, as a replay of random draws is,
  and the module is remembered (with its inputs' shapes) so that later steps go there directly;
* a re-run that fails, or whose rows do not reproduce autograd's, is found by the engine's check
  (:mod:`jdoptim.autogram._certify`), which then takes that module's rows from autograd instead.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

from ...linalg.sparse_rows import dense
from ...linalg.vmap_fallback import batched_vjp, fallback_notice_silenced, vmap_or_loop
from .._additions import replay
from .._sample_dims import input_sample_dims
from .._shared import replaying
from ._base import LayerRule
from ._call import Call

#: Tensors by parameter or buffer name.
_Named = dict[str, Tensor]
#: The recorded call's positional and keyword arguments.
_Args = tuple[Any, ...]
_Kwargs = dict[str, Any]
#: One tensor per tapped output (outputs, or their cotangents).
_Outs = tuple[Tensor, ...]
#: A sample-shared call as it was made: its arguments, output shape and sample dimension.
_Unexpanded = tuple[_Args, _Kwargs, torch.Size, int]


#: the modules that ``torch.func`` could not re-run, with the shapes of the inputs it failed on:
#: re-run eagerly from then on, on inputs of those shapes
_EAGER: weakref.WeakKeyDictionary[torch.nn.Module, set[tuple]] = weakref.WeakKeyDictionary()


def _detach(tree: Any) -> Any:
    return tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, tree)


class GenericRule(LayerRule):
    #: a call whose samples are folded with another dimension (``Call.group = k``) is re-run
    #: on each sample's ``k`` entries, its own layout with ``k`` entries instead of ``b·k``
    grouped_samples = True
    #: how messages name the module (the engine sets its path in the model)
    label: str = ""
    #: per-sample rows from the whole call (masked output gradients), not from slices of it
    whole: bool = False
    #: the re-run is eager, differentiated by autograd (not by torch.func: :meth:`_eager_rows`)
    eager: bool = False

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        names: dict[Tensor, str] = {}
        for name, param in call.module.named_parameters():
            names.setdefault(param, name)
        self.names = names
        self._rows: dict[str, Tensor] | None = None

    def _all_rows(self) -> dict[str, Tensor]:
        if self._rows is None:
            # The engine runs rules under no_grad; the re-run must still take the module's
            # training code path (an LSTM's inference kernel, for one, cannot be differentiated).
            saved = _attributes(self.call.module)
            _freeze_running_statistics(self.call.module)
            try:
                with torch.enable_grad():
                    rows = self._compute_rows()
                # a sparse gradient (F.embedding(..., sparse=True)) becomes dense rows here
                self._rows = {n: dense(r) for n, r in rows.items()}
            except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
                name = self.label or type(self.call.module).__name__
                raise RuntimeError(
                    f"{name}: re-running its forward to differentiate it (the generic rule, "
                    f"used for modules without a layer rule) failed: {err}"
                ) from err
            finally:
                _restore(saved)
        return self._rows

    def _compute_rows(self) -> dict[str, Tensor]:
        call = self.call
        if call.record.mutated:
            raise RuntimeError(
                f"its forward changed its buffers {', '.join(call.record.mutated)} in place, so "
                "a re-run would read the changed values, not the recorded call's"
            )
        primals = {self.names[p]: p.detach() for p in call.params}
        buffers = {n: b.clone() for n, b in call.module.named_buffers()}
        args, kwargs = _detach(call.record.args), _detach(call.record.kwargs)
        grads = tuple(call.grad(i) for i in range(len(call.record.tapped)))
        operands = (primals, buffers, args, kwargs, grads)
        shapes = tuple(
            tuple(t.shape) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)
        )
        if shapes in _EAGER.get(call.module, ()):
            return self._eager_rows(*operands)
        try:
            return self._routed_rows(*operands)
        except (RuntimeError, NotImplementedError):  # torch.func could not run the re-run
            rows = self._eager_rows(*operands)  # (raises if the eager re-run fails too)
            _EAGER.setdefault(call.module, set()).add(shapes)
            return rows

    def _routed_rows(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs, grads: _Outs
    ) -> _Named:
        call = self.call
        if call.record.unexpanded is not None:
            return self._shared_rows(primals, buffers, call.record.unexpanded, grads)
        if call.batch_dim is None:
            rows = self._whole_rows(primals, buffers, args, kwargs, grads)
            return {n: r.unsqueeze(0) for n, r in rows.items()}
        if call.record.rng is not None or self.whole or self.eager or call.rows is not None:
            return self._masked_rows(primals, buffers, args, kwargs, grads)
        return self._sample_rows(primals, buffers, args, kwargs, grads)

    def _eager_rows(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs, grads: _Outs
    ) -> _Named:
        """The rows from an eager re-run of the whole call, differentiated by autograd (as a
        replay of random draws is), for a module that ``torch.func`` cannot re-run: an
        ``autograd.Function`` without ``setup_context`` (RecurrentGemma's RG-LRU scan)."""
        self.eager = True
        return self._routed_rows(primals, buffers, args, kwargs, grads)

    def _outputs(self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs) -> _Outs:
        amp = self.call.record.autocast
        autocast = contextlib.nullcontext() if amp is None else torch.autocast(amp[0], dtype=amp[1])
        with autocast, replaying():
            out = functional_call(self.call.module, {**primals, **buffers}, args, kwargs)
        leaves = [out] if isinstance(out, Tensor) else tree_flatten(out)[0]
        record = self.call.record
        if record.paths:  # read at its additions: its output through each path's operations
            own = leaves[record.tapped[0].leaf_index]
            return tuple(replay(ops, own) for ops, _ in record.paths)
        return tuple(leaves[t.leaf_index] for t in record.tapped)

    def _shared_rows(
        self, primals: _Named, buffers: _Named, unexpanded: _Unexpanded, grads: _Outs
    ) -> _Named:
        """Rows of a sample-shared call whose output ``Y`` the hook expanded along the batch, or
        that is read at the additions that give it to the samples (see :mod:`.._shared` and
        :mod:`.._additions`): every sample's copy is ``Y``, so row ``(i, k)`` is the
        vector-Jacobian product of the call as it was made (through each path's shape
        operations) with ``D[k]`` at sample ``i`` (each sample's ``w`` entries summed, for folded
        activations), and, in task mode, row ``k`` the one with ``Σᵢ D[k]`` at sample ``i``."""
        args, kwargs, shape, dim = unexpanded
        args, kwargs = _detach(args), _detach(kwargs)
        shapes = [path_shape for _, path_shape in self.call.record.paths] or [shape]
        t = grads[0].shape[0]
        moved = [grad.movedim(dim + 1, 1) for grad in grads]  # [T, b(·w), ...]
        if self.call.group > 1:  # each sample's w entries
            moved = [m.unflatten(1, (self.call.b, self.call.group)).sum(2) for m in moved]
        if self.call.batch_dim is None:
            summed = tuple(m.sum(1).reshape(t, *s) for m, s in zip(moved, shapes))
            rows = self._whole_rows(primals, buffers, args, kwargs, summed)
            return {n: r.unsqueeze(0) for n, r in rows.items()}
        b = moved[0].shape[1]
        cotangents = tuple(m.transpose(0, 1).reshape(b * t, *s) for m, s in zip(moved, shapes))
        rows = self._whole_rows(primals, buffers, args, kwargs, cotangents)
        return {n: r.reshape(b, t, *r.shape[1:]) for n, r in rows.items()}

    def _pullback(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs
    ) -> Callable[[_Outs], tuple[_Named]]:
        """``vjp`` of the whole call, re-run in its autocast region (as every re-run)."""

        def f(p: _Named) -> _Outs:
            return self._outputs(p, buffers, args, kwargs)

        return vjp(f, primals)[1]

    def _whole_rows(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs, cotangents: _Outs
    ) -> _Named:
        """Rows ``[R, *θ]`` of the whole call for cotangents ``[R, *Y]`` (one per output)."""
        if self.call.record.rng is not None or self.eager:
            return self._replayed_rows(primals, buffers, args, kwargs, cotangents)
        pullback = self._pullback(primals, buffers, args, kwargs)

        def looped() -> dict[str, Tensor]:
            count = cotangents[0].shape[0]
            rows = [pullback(tuple(g[k] for g in cotangents))[0] for k in range(count)]
            return {n: torch.stack([r[n] for r in rows]) for n in primals}

        return vmap_or_loop(lambda _: vmap(pullback)(cotangents)[0], looped)

    def _replayed_rows(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs, cotangents: _Outs
    ) -> _Named:
        """:meth:`_whole_rows` of a call that drew random numbers: re-run eagerly, with the
        recorded call's generator states, and differentiated by autograd.

        Not by ``torch.func.vjp``: under its transform, ``dropout`` of a non-contiguous tensor
        (CvT's patch embeddings, a permuted view) lays the same random stream out in another
        order than the eager call did, so the masks differ; an eager re-run draws exactly the
        recorded call's numbers."""
        rng = self.call.record.rng
        leaves = {n: p.detach().requires_grad_(True) for n, p in primals.items()}
        if rng is None:  # (an eager re-run of a call that drew nothing: :meth:`_eager_rows`)
            outs = self._outputs(leaves, buffers, args, kwargs)
        else:
            with torch.random.fork_rng(devices=rng.devices()):
                rng.restore()
                outs = self._outputs(leaves, buffers, args, kwargs)
        reached = [(o, c) for o, c in zip(outs, cotangents) if o.requires_grad]
        outputs, grads = [o for o, _ in reached], [c for _, c in reached]
        inputs = list(leaves.values())
        found = batched_vjp(outputs, inputs, grads, False) if reached else [None] * len(inputs)
        count = cotangents[0].shape[0]
        return {
            n: p.new_zeros(count, *p.shape) if g is None else g
            for (n, p), g in zip(primals.items(), found)
        }

    def _masked_rows(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs, grads: _Outs
    ) -> _Named:
        """Per-sample rows from the whole call: row ``(i, k)`` is the vector-Jacobian product
        with ``D[k]`` kept on sample ``i`` and zero elsewhere, ``∂ℓ_{ik}/∂θ`` since loss
        ``(i, k)`` reaches this call through sample ``i``'s outputs only."""
        call = self.call
        b, t = call.b, call.T
        cotangents = []
        for index, grad in enumerate(grads):  # grad: [T, *Y], samples on dim out_dim + 1
            dim = call.out_dim(index)
            assert dim is not None
            if call.rows is not None:  # [b, n]: sample i's entries, gathered in any order
                eye = F.one_hot(call.rows.to(grad.device), b).T.to(grad.dtype)
            else:
                eye = torch.eye(b, dtype=grad.dtype, device=grad.device)
                eye = eye.repeat_interleave(call.group_of(index), dim=1)  # sample i's k entries
            entries = eye.shape[1]
            mask = eye.reshape(b, 1, *(entries if d == dim else 1 for d in range(grad.dim() - 1)))
            cotangents.append((grad.unsqueeze(0) * mask).reshape(b * t, *grad.shape[1:]))
        rows = self._whole_rows(primals, buffers, args, kwargs, tuple(cotangents))
        return {n: r.reshape(b, t, *r.shape[1:]) for n, r in rows.items()}

    def _sample_rows(
        self, primals: _Named, buffers: _Named, args: _Args, kwargs: _Kwargs, grads: _Outs
    ) -> _Named:
        call = self.call
        assert call.batch_dim is not None
        flat, spec = tree_flatten((args, kwargs))
        k = call.group
        dims = input_sample_dims(call.module, flat, call.batch_dim, call.b * k)
        if all(d is None for d in dims) and call.groups is None:  # no input holds the samples
            # (Perceiver's position encodings expand a parameter to an int batch size)
            return self._masked_rows(primals, buffers, args, kwargs, grads)
        if call.groups is not None:
            return self._grouped_rows(primals, buffers, flat, spec, grads)
        out_dims = [call.sample_out_dim(i) for i in range(len(grads))]
        if k > 1:  # [.., b·k, ..] → [.., b, k, ..]: vmap hands each sample its k entries
            flat = [t if d is None else t.unflatten(d, (call.b, k)) for t, d in zip(flat, dims)]
            grads = tuple(g.unflatten(d + 1, (call.b, k)) for g, d in zip(grads, out_dims))

        def one(flat_one: list[Any], grads_one: tuple[Tensor, ...]) -> dict[str, Tensor]:
            restored = flat_one
            cotangents = grads_one
            if k == 1:  # one sample is a batch of one
                restored = [t.unsqueeze(d) if d is not None else t for t, d in zip(flat_one, dims)]
                cotangents = tuple(g.unsqueeze(d + 1) for g, d in zip(grads_one, out_dims))
            args_one, kwargs_one = tree_unflatten(restored, spec)
            pullback = vjp(lambda p: self._outputs(p, buffers, args_one, kwargs_one), primals)[1]
            return vmap(pullback)(cotangents)[0]

        in_dims = (dims, tuple(d + 1 for d in out_dims))
        return vmap_or_loop(
            lambda _: vmap(one, in_dims=in_dims)(flat, grads),
            lambda: self._sample_rows_by_loop(primals, buffers, flat, spec, dims, out_dims, grads),
        )

    def _grouped_rows(
        self, primals: _Named, buffers: _Named, flat: list[Any], spec: TreeSpec, grads: _Outs
    ) -> _Named:
        """:meth:`_sample_rows` for a call whose outputs fold the samples with other
        dimensions by different factors (:attr:`~.Call.groups`: WavLM's attention returns
        ``[b, s, d]`` and a ``[b·heads, s, s]`` position bias, which the next layer takes): an
        input with ``k·b`` entries along the sample dimension, ``k`` one of the outputs'
        factors, gives each sample its ``k`` entries, as each output does."""
        call, batch_dim = self.call, self.call.batch_dim
        assert call.groups is not None and batch_dim is not None
        b, factors = call.b, set(call.groups)

        def factor(t: Any) -> int | None:
            if not isinstance(t, Tensor) or t.dim() <= batch_dim:
                return None
            size = t.shape[batch_dim]
            return size // b if size % b == 0 and size // b in factors else None

        ks = [factor(t) for t in flat]
        dims = [None if k is None else batch_dim for k in ks]
        out_dims = [call.sample_out_dim(i) for i in range(len(grads))]
        split = [t if k is None else t.unflatten(batch_dim, (b, k)) for t, k in zip(flat, ks)]
        grads = tuple(g.unflatten(d + 1, (b, k)) for g, d, k in zip(grads, out_dims, call.groups))

        def one(flat_one: list[Any], grads_one: tuple[Tensor, ...]) -> dict[str, Tensor]:
            args_one, kwargs_one = tree_unflatten(flat_one, spec)
            pullback = vjp(lambda p: self._outputs(p, buffers, args_one, kwargs_one), primals)[1]
            return vmap(pullback)(grads_one)[0]

        in_dims = (dims, tuple(d + 1 for d in out_dims))
        with fallback_notice_silenced():
            return vmap(one, in_dims=in_dims)(split, grads)

    def _sample_rows_by_loop(
        self,
        primals: _Named,
        buffers: _Named,
        flat: list[Any],
        spec: TreeSpec,
        dims: list[int | None],
        out_dims: list[int],
        grads: _Outs,
    ) -> _Named:
        call = self.call
        per_sample = []

        def take(t: Tensor, d: int, i: int) -> Tensor:  # sample i (grouped: its k entries)
            return t.narrow(d, i, 1) if call.group == 1 else t.select(d, i)

        for i in range(call.b):
            sliced = [take(t, d, i) if d is not None else t for t, d in zip(flat, dims)]
            args_one, kwargs_one = tree_unflatten(sliced, spec)
            pullback = vjp(
                lambda p, a=args_one, k=kwargs_one: self._outputs(p, buffers, a, k), primals
            )[1]
            rows = [
                pullback(tuple(take(g[k], d, i) for g, d in zip(grads, out_dims)))[0]
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


_MISSING = object()


def _attributes(module: torch.nn.Module) -> list[tuple[torch.nn.Module, dict[str, Any]]]:
    """A shallow copy of every submodule's attribute dict (see :func:`_restore`)."""
    return [(m, dict(m.__dict__)) for m in module.modules()]


def _freeze_running_statistics(module: torch.nn.Module) -> None:
    """Batch norms in training mode normalise with the batch's own statistics and update their
    running ones in place, which ``torch.func`` refuses in a re-run (and which must happen once
    per user forward anyway): for the re-run, they stop tracking (the same output, no update;
    :func:`_restore` puts the flag back)."""
    for sub in module.modules():
        if isinstance(sub, _BatchNorm) and sub.training and sub.track_running_stats:
            sub.track_running_stats = False


def _restore(saved: list[tuple[torch.nn.Module, dict[str, Any]]]) -> None:
    """Put back the attributes a re-run rebound or added (a counter, a cache)."""
    for module, attributes in saved:
        now = module.__dict__
        if len(now) != len(attributes) or any(
            now.get(name, _MISSING) is not value for name, value in attributes.items()
        ):
            module.__dict__.clear()
            module.__dict__.update(attributes)
