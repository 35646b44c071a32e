r"""The Gramian engine: ``G = J Jᵀ`` of the losses' Jacobian, layer by layer, from forward hooks.

How it works (details in :mod:`._records`, :mod:`._graph`, :mod:`._step`, :mod:`.rules`):

* **Hooks.** The parent-most modules with direct trainable parameters are hooked
  (:mod:`._selection`). A hook stores a record of the call (module, inputs, output shapes) in the
  ``metadata`` of its outputs' ``grad_fn`` nodes, so it lives and dies with the graph; nothing is
  kept on the engine and a plain forward/backward pays only the hook call.
* **One backward** from the losses to the hooked calls' outputs gives the output gradients ``D``
  (``T`` rows at once by vmap; ``T = 1`` for per-sample losses); the modules' own weight
  gradients are never computed by autograd.
* **Per-layer rules** turn ``(inputs, D)`` into the call's Gramian contribution without the full
  Jacobian: ``Linear``, ``Conv1d/2d``, ``Embedding`` and the affine parameters of ``LayerNorm``,
  ``RMSNorm``, ``GroupNorm`` and ``BatchNorm`` have closed forms (e.g. ``(AAᵀ)⊙(DDᵀ)`` for a
  ``Linear`` layer on per-sample losses); every other module falls back to ``torch.func``
  (``vjp`` of a re-run of the call, vmapped over rows and samples).
* **Exactness.** Parameters used by several calls (a module called twice, an embedding tied to an
  output layer) have their rows summed over the calls before their Gram matrix is taken;
  parameters used outside any hooked call get their rows straight from autograd.

Cost model, per hooked ``Linear``-like layer with ``b`` samples, ``S`` positions per sample,
``T`` losses per sample, ``d`` inputs and ``o`` outputs: the backward costs ``T`` times the
activation-gradient part of an ordinary backward; the Gramian costs
``min(bTSod + (bT)²od, b²d + (bT)²o)`` for ``S = 1`` (``(bS)²d + b²S²To + b²T²So`` for the
contraction when ``S > 1``); the update is one ordinary weight-gradient product. The generic
fallback costs one forward of the module plus ``bT`` vector-Jacobian products and ``bT·n``
memory for its ``n`` parameters.

Limits, by design:

* a module handled by the ``torch.func`` fallback is re-run once per step, so it must be
  deterministic (no active dropout inside it; ``Linear``/``Conv``/norm rules never re-run);
* with explicit parameters (used outside hooked calls) the backward needs one row per loss, so
  per-sample losses then cost ``b`` backward rows instead of one (still exact);
* in per-sample mode a fallback input counts as batched when its size along ``batch_dim`` is the
  number of samples (an unbatched ``[b, b]`` mask would be misread); every hooked output must
  index the samples (checked; RNN hidden states along dimension 1 are understood).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ..aggregation.flattening import generalize_gramian
from ._records import make_hook
from ._selection import batch_norms, check_disjoint, hooked_modules, sample_mixing_problem
from ._step import GramianStep, VmapState

__all__ = ["Engine", "gramian_dtype"]

_COUNTER = itertools.count()


def gramian_dtype(losses_dtype: torch.dtype, params: Iterable[Tensor]) -> torch.dtype:
    """The dtype a Gramian is returned and weighted in: the losses' promoted with every
    parameter's, so that half-precision losses of a float32 model (``model(x).bfloat16()``) do
    not round a Gramian whose rows are float32 sums to 3 significant digits (issue 19)."""
    dtype = losses_dtype
    for p in params:
        if p.dtype != dtype:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _remove_all(handles: list[RemovableHandle]) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class Engine:
    r"""Computes Gramians ``G = J Jᵀ`` of outputs with respect to the modules' parameters.

    Args:
        modules: the modules whose parameters the Jacobian is taken with respect to (disjoint:
            none a submodule of another). A module with direct trainable parameters is hooked and
            differentiated with respect to all its parameters; one without is descended into.
        batch_dim: the dimension of the output (and of every module's tensors) that indexes
            independent samples, or ``None``. With it, modules that mix samples (``BatchNorm`` in
            training mode, batch-statistics ``BatchNorm``, RNNs and attention batched on another
            dimension) are refused.

    Use ``engine.close()`` (or ``with Engine(model) as engine:``) to remove the hooks; a dropped
    engine removes them too.
    """

    def __init__(self, *modules: nn.Module | Iterable[nn.Module], batch_dim: int | None = None):
        flat: list[nn.Module] = []
        for item in modules:
            if isinstance(item, nn.Module):
                flat.append(item)
            else:
                flat.extend(item)
        if not flat:
            raise ValueError("Engine needs at least one module.")
        for module in flat:
            if not isinstance(module, nn.Module):
                raise TypeError(f"Engine takes nn.Module objects, got {type(module).__name__}.")
        if batch_dim is not None and (not isinstance(batch_dim, int) or batch_dim < 0):
            raise ValueError(f"batch_dim must be a non-negative int or None, got {batch_dim!r}.")
        check_disjoint(flat)
        if batch_dim is not None:
            problem = sample_mixing_problem(flat, batch_dim)
            if problem:
                raise ValueError(problem)
        self.modules = tuple(flat)
        self.batch_dim = batch_dim
        self._batch_norms = batch_norms(flat) if batch_dim is not None else []
        self._key = f"jdoptim.autogram.{next(_COUNTER)}"
        self._hooked = hooked_modules(flat)
        hook = make_hook(self._key)
        handles = [m.register_forward_hook(hook, with_kwargs=True) for m in self._hooked]
        self._finalizer = weakref.finalize(self, _remove_all, handles)
        self._vmap = VmapState()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Remove the hooks. Outputs computed afterwards are no longer seen by the engine."""
        self._finalizer()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def parameters(self) -> list[Tensor]:
        """The trainable parameters of the modules, each once."""
        params = (p for m in self.modules for p in m.parameters() if p.requires_grad)
        return list(dict.fromkeys(params))

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("This engine is closed: its hooks were removed.")
        if any(m.training or not m.track_running_stats for m in self._batch_norms):
            problem = sample_mixing_problem(self.modules, self.batch_dim)  # type: ignore[arg-type]
            if problem:
                raise ValueError(problem)

    def step(
        self,
        losses: Tensor,
        shared: list[Tensor],
        specific: list[Tensor],
        per_sample: bool,
        retain_graph: bool = False,
        assume_reached: bool = True,
    ) -> GramianStep:
        """Run the backward pass of one step; the result gives the Gramian and the update."""
        self._check_open()
        return GramianStep(
            losses,
            self._key,
            shared,
            specific,
            self.batch_dim if per_sample else None,
            retain_graph=retain_graph,
            vmap_state=self._vmap,
            assume_reached=assume_reached,
        )

    def compute_gramian(self, output: Tensor, retain_graph: bool = False) -> Tensor:
        r"""The Gramian of ``output`` with respect to the modules' parameters.

        A scalar gives a 0-D Gramian ``‖∇y‖²``; a vector of ``m`` values an ``m × m`` matrix; an
        output of shape ``[m₁, …, m_k]`` the generalized Gramian of shape
        ``[m₁, …, m_k, m_k, …, m₁]`` with ``G[a, reversed(c)] = ⟨∇y_a, ∇y_c⟩`` (see
        :class:`~jdoptim.aggregation.Flattening`). With ``batch_dim``, ``output``'s dimension
        ``batch_dim`` indexes independent samples. Frees the graph unless ``retain_graph``.
        """
        step = self.step(
            output,
            self.parameters(),
            [],
            per_sample=self.batch_dim is not None,
            retain_graph=retain_graph,
            assume_reached=False,
        )
        with torch.no_grad():
            gramian = step.gramian().to(gramian_dtype(output.dtype, self.parameters()))
        return generalize_gramian(gramian, tuple(output.shape))
