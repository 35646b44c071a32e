r"""The analytic floor of a *per-sample* JD step on a real model: the engine's products, no more.

:mod:`benchmarks.hand_fused_models` is the floor of a task-loss step. This is the same for
per-sample losses ``ℓ_i`` (one per sample, ``batch_dim=0``), written for models whose every
parameter sits in a ``Linear``, transformers' ``Conv1D``, a ``Conv2d``, an ``Embedding`` or a norm,
none tied and none used by two calls (Llama small and ResNet-18 GN here; GPT-2 tiny's tied
``wte`` and sample-shared ``wpe``, and ViT's class token and position embeddings, have their
closed forms in :class:`HandFusedSharedStep`). Forward hooks record every such call's input
``X`` and output ``Y``; then

* one ordinary backward with all-ones output weights gives ``D = ∂(Σᵢ ℓᵢ)/∂Y``, whose sample-``i``
  slice is ``∂ℓᵢ/∂Y_i``;
* a ``Conv2d``'s per-sample rows come from its weight-gradient kernel vmapped over the samples
  (from 256 output positions per image, as the library's rule), else it is a Linear-like layer
  on its im2col columns;
* a Linear-like layer contributes ``G_ij = Σ_{s,r} (⟨a_{is}, a_{jr}⟩ + 1) ⟨D_{is}, D_{jr}⟩`` by the
  kernel contraction (:func:`jdoptim.autogram.rules.linear_gramian`) where the engine's cost
  model picks it, else by its explicit rows ``Σ_s D_{is} a_{is}ᵀ``; an embedding
  ``Σ_{s,r} [idx_{is} = idx_{jr}] ⟨D_{is}, D_{jr}⟩``; a norm's affine parameters their rows
  ``Σ_s D_{is} ⊙ n(x)_{is}`` and ``Σ_s D_{is}``;
* every explicit row side by side in one reused matrix ``R``, as the engine holds them: their
  Gramian ``R Rᵀ`` and update ``Rᵀ w`` in one product each;
* ``w = W(G)`` by UPGrad's weighting on the ``b × b`` Gramian;
* the other layers' update from the weighted ``D`` (``Σᵢ wᵢ D_i``), then the optimizer's step.

:func:`check_against_library` gives one float64 forward's losses to this step and to
``JDOptimizer(modules=model, batch_dim=0)`` and asserts that the Gramians and the ``.grad`` agree.

Run: ``PYTHONPATH=$PWD python benchmarks/hand_fused_per_sample.py`` (``BENCH_TINY=1`` for a smoke
run; ``BENCH_THREADS`` sets the threads, 2 by default).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.hand_fused_models import (
    Recorded,
    RecordingStep,
    _normalised,
    conv_weight_grad,
    make_floor_step,
)
from benchmarks.interleave import interleaved_ratio
from benchmarks.test_bench_models import THREADS, TINY, build, make_step
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram.rules import linear_gramian
from jdoptim.autogram.rules._contraction import linear_rows, takes_contraction
from jdoptim.linalg.gramian import gram_matrix
from jdoptim.updates.base import weigh

#: the models this floor covers (see the module docstring)
PER_SAMPLE_MODELS = ("gpt2-tiny", "llama-small", "vit", "resnet18-gn")
#: the models with tied or sample-shared parameters, which :class:`HandFusedSharedStep` covers
SHARED_MODELS = ("gpt2-tiny", "vit")
#: per-sample convolution rows from the weight-gradient kernel from this many output positions per
#: image up, below it im2col and the Linear contraction (the library's conv rule's threshold)
DIRECT_CONV_POSITIONS = 256


class HandFusedPerSampleStep(RecordingStep):
    """``step(losses)`` with ``losses`` a ``[b]`` vector of per-sample losses.

    A subclass covers parameters outside the recorded layers, or shared by several, by their
    closed forms: :meth:`_extra_outputs` (more tensors whose output gradients it needs),
    :meth:`_special_rows` (those parameters' rows) and :attr:`special` (the recorded layers they
    replace)."""

    #: ids of recorded layers whose parameters :meth:`_special_rows` covers (skipped otherwise)
    special: dict[int, str]

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        self.special = {}
        self._check_parameters(model)

    def _check_parameters(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        owners = self.owners
        if any(id(p) not in owners for p in params) or any(n > 1 for n in owners.values()):
            raise ValueError("this floor needs every parameter in exactly one recorded layer")

    def _extra_outputs(self) -> list[Tensor]:
        """Tensors besides the recorded calls' outputs whose output gradients
        :meth:`_special_rows` reads (after the calls' in ``grads``)."""
        return []

    def _special_rows(self, grads: list[Tensor], b: int) -> list[tuple[Tensor, Tensor]]:
        """Rows ``(parameter, [b, n])`` of the parameters the recorded layers do not cover."""
        return []

    def gradients(self, losses: Tensor, retain_graph: bool = False) -> Tensor:
        """Sets every parameter's ``.grad`` to ``Jᵀ w``; returns ``G``."""
        b = losses.shape[0]
        if len({id(c.module) for c in self.calls}) != len(self.calls):
            raise ValueError("this floor needs each recorded layer called once per forward")
        outputs = [c.y for c in self.calls] + self._extra_outputs()
        grads = torch.autograd.grad(losses, outputs, torch.ones_like(losses), retain_graph)
        with torch.no_grad():
            gramian = torch.zeros(b, b, dtype=grads[0].dtype)
            rows = self._special_rows(grads, b)
            others = []
            for call, d in zip(self.calls, grads):
                if id(call.module) in self.special:
                    continue
                found = _call_rows(call, d)
                if found is None:
                    gramian += _call_gramian(call, d)
                    others.append((call, d))
                else:
                    rows += found
            matrix = self.held.fill(rows) if rows else None
            if matrix is not None:
                gramian += gram_matrix(matrix)
            weights = weigh(self.weighting, gramian).to(losses.dtype)
            if matrix is not None:
                self.held.apply(weights, [p for p, _ in rows], matrix)
            for call, d in others:
                _set_update(call, d * weights.view(b, *(1,) * (d.dim() - 1)))
        return gramian


def _linear_like(call: Recorded, d: Tensor) -> tuple[Tensor, Tensor, bool]:
    """``A`` ``[b, S, d]``, ``D`` ``[1, b, S, o]`` and whether there is a bias (``Conv2d`` by
    im2col)."""
    m, b = call.module, d.shape[0]
    with_bias = getattr(m, "bias", None) is not None
    if call.kind == "conv2d":
        cols = F.unfold(call.x, m.kernel_size, m.dilation, m.padding, m.stride)  # [b, Ckk, L]
        return cols.transpose(1, 2), d.flatten(2).transpose(1, 2).unsqueeze(0), with_bias
    a = call.x.reshape(b, -1, call.x.shape[-1])
    return a, d.reshape(1, b, -1, d.shape[-1]), with_bias


def _call_rows(call: Recorded, d: Tensor) -> list[tuple[Tensor, Tensor]] | None:
    """The call's per-sample rows ``(parameter, [b, n])`` where the engine forms them (a norm,
    a convolution on large maps, a Linear-like layer whose rows are cheaper than its kernel),
    else ``None``."""
    m, b = call.module, d.shape[0]
    if call.kind == "embedding":
        return None
    if call.kind == "norm":
        n, dims = _normalised(call)
        per_sample = tuple(k for k in dims if k != 0)  # the dimensions summed within a sample
        found = [(m.weight, (d * n).sum(per_sample).reshape(b, -1))]
        if getattr(m, "bias", None) is not None:
            found.append((m.bias, d.sum(per_sample).reshape(b, -1)))
        return found
    if call.kind == "conv2d" and d.shape[-1] * d.shape[-2] >= DIRECT_CONV_POSITIONS:
        weight = torch.vmap(lambda g, x: conv_weight_grad(call, g[None], x[None]))(d, call.x)
        found = [(m.weight, weight.reshape(b, -1))]
        if m.bias is not None:
            found.append((m.bias, d.sum((2, 3))))
        return found
    a, dd, with_bias = _linear_like(call, d)
    if takes_contraction(b, a.shape[1], 1, a.shape[2] + with_bias, dd.shape[-1]):
        return None
    weight = linear_rows(a, dd)[:, 0]  # [b, o, d]
    if call.kind == "conv1d":
        weight = weight.transpose(1, 2)
    found = [(m.weight, weight.reshape(b, -1))]
    if with_bias:
        found.append((m.bias, dd[0].sum(1)))
    return found


def _call_gramian(call: Recorded, d: Tensor) -> Tensor:
    """The per-sample Gramian ``[b, b]`` of a call whose rows are not formed (:func:`_call_rows`):
    an embedding's by its index kernel, a Linear-like layer's by the kernel contraction."""
    b = d.shape[0]
    if call.kind == "embedding":
        index = call.x.reshape(-1)
        flat = d.reshape(index.shape[0], -1)
        same = index[:, None] == index[None, :]
        products = (flat @ flat.T) * same.to(flat.dtype)
        return products.reshape(b, -1, b, products.shape[0] // b).sum((1, 3))
    a, dd, with_bias = _linear_like(call, d)
    return linear_gramian(a, dd, with_bias).reshape(b, b)


def _set_update(call: Recorded, dw: Tensor) -> None:
    """``.grad`` of the call's parameters from the weighted output gradient ``Σᵢ wᵢ D_i``."""
    m = call.module
    if call.kind == "conv2d":
        m.weight.grad = conv_weight_grad(call, dw, call.x)
        if m.bias is not None:
            m.bias.grad = dw.sum((0, 2, 3))
        return
    if call.kind in ("linear", "conv1d"):
        flat, a = dw.reshape(-1, dw.shape[-1]), call.x.reshape(-1, call.x.shape[-1])
        m.weight.grad = a.T @ flat if call.kind == "conv1d" else flat.T @ a
        if getattr(m, "bias", None) is not None:
            m.bias.grad = flat.sum(0)
        return
    if call.kind == "embedding":
        flat = dw.reshape(-1, dw.shape[-1])
        grad = torch.zeros_like(m.weight)
        m.weight.grad = grad.index_add_(0, call.x.reshape(-1), flat)
        return
    n, dims = _normalised(call)
    m.weight.grad = (dw * n).sum(dims).reshape(m.weight.shape)
    if getattr(m, "bias", None) is not None:
        m.bias.grad = dw.sum(dims).reshape(m.bias.shape)


def check_against_library(model_name: str) -> float:
    """One float64 forward, its per-sample losses given to the floor and to ``JDOptimizer``
    (UPGrad, ``batch_dim=0``, ``scope="all"``): Gramians and ``.grad`` must agree (relative
    max-entry errors ``< 1e-9``); returns the Gramian's."""
    model, losses_of = build(model_name, "per-sample", torch.float64)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    step_class = HandFusedSharedStep if model_name in SHARED_MODELS else HandFusedPerSampleStep
    fused = step_class(model, torch.optim.SGD(params, lr=0.0))
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=0, scope="all"
    )
    losses = losses_of(model)
    gramian = fused.gradients(losses, retain_graph=True)
    floor_grads = torch.cat([p.grad.flatten() for p in params])
    opt.zero_grad()
    record = opt.step(losses)
    assert record.gramian is not None
    library_grads = torch.cat([p.grad.flatten() for p in params])
    expected = record.gramian.double()
    error = ((gramian - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-9, f"{model_name}: floor and library Gramians differ ({error:.2g})"
    grad_error = (floor_grads - library_grads).abs().max() / library_grads.abs().max()
    assert grad_error < 1e-9, f"{model_name}: .grad differs ({grad_error:.2g})"
    return error


class HandFusedSharedStep(HandFusedPerSampleStep):
    """The per-sample floor of GPT-2 tiny and ViT, whose parameters are not all in one recorded
    layer each, by their closed forms (the model's structure is known here, not read):

    * GPT-2: ``wte`` is read by the lookup and by the tied head, so its rows are the head's
      ``Σ_s D_{is} a_{is}ᵀ`` plus the lookup's output gradients scattered by token; ``wpe`` is
      looked up at ``arange(S)`` once for every sample and added to the token embeddings, so
      sample ``i``'s rows of it are the token embeddings' output gradient ``D_i`` (``[S, d]``);
    * ViT: the class token and the position embeddings are added in the embeddings module
      (``cat(cls, patches) + pos``), so with ``D`` that module's output gradient, the rows are
      ``D_i`` for the position embeddings and ``D_{i,0}`` for the class token.

    Every other recorded layer as :class:`HandFusedPerSampleStep`'s.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        self.gpt2 = hasattr(model, "transformer") and hasattr(model.transformer, "wpe")
        if self.gpt2:
            core = model.transformer
            self.wte, self.wpe = core.wte.weight, core.wpe.weight
            self.special = {id(core.wte): "wte", id(core.wpe): "wpe", id(model.lm_head): "head"}
        else:
            embeddings = model.vit.embeddings
            self.cls, self.pos = embeddings.cls_token, embeddings.position_embeddings
            self.embedded: list[Tensor] = []
            embeddings.register_forward_hook(lambda m, a, out: self.embedded.append(out))

    def zero_grad(self) -> None:
        super().zero_grad()
        if not self.gpt2:
            self.embedded.clear()

    def _check_parameters(self, model: nn.Module) -> None:
        """(Nothing to check: the parameters outside one recorded layer are the class
        docstring's, covered by :meth:`_special_rows`.)"""

    def _extra_outputs(self) -> list[Tensor]:
        return [] if self.gpt2 else self.embedded[-1:]

    def _special_rows(self, grads: list[Tensor], b: int) -> list[tuple[Tensor, Tensor]]:
        """The rows ``(parameter, [b, n])`` of the parameters of the class docstring."""
        if not self.gpt2:
            d = grads[-1]  # the embeddings' output gradient [b, S + 1, e]
            return [(self.cls, d[:, 0].reshape(b, -1)), (self.pos, d.reshape(b, -1))]
        by_kind = {
            self.special[id(c.module)]: (c, d)
            for c, d in zip(self.calls, grads)
            if id(c.module) in self.special
        }
        lookup, d_lookup = by_kind["wte"]
        head, d_head = by_kind["head"]
        a, dd, _ = _linear_like(head, d_head)
        vocab = self.wte.shape[0]
        tokens = lookup.x.reshape(b, -1) + vocab * torch.arange(b)[:, None]
        wte = linear_rows(a, dd)[:, 0].reshape(b * vocab, -1)  # the head's, [b·V, e]
        wte.index_add_(0, tokens.reshape(-1), d_lookup.reshape(-1, d_lookup.shape[-1]))
        wpe = torch.zeros(b, *self.wpe.shape, dtype=d_lookup.dtype)
        wpe[:, : d_lookup.shape[1]] = d_lookup
        return [(self.wte, wte.reshape(b, -1)), (self.wpe, wpe.reshape(b, -1))]


def make_per_sample_floor_step(model_name: str):
    """A closure running one per-sample floor step (Adam)."""
    step = HandFusedSharedStep if model_name in SHARED_MODELS else HandFusedPerSampleStep
    return make_floor_step(model_name, "per-sample", step)


def main() -> None:
    torch.set_num_threads(THREADS)
    rounds = 3 if TINY else 30
    print("| model | Gramian check (float64) | floor / plain | JDOptimizer / floor |")
    print("|---|---|---|---|")
    for model_name in PER_SAMPLE_MODELS:
        error = check_against_library(model_name)
        floor = make_per_sample_floor_step(model_name)
        plain = make_step(model_name, "per-sample", "plain")
        library = make_step(model_name, "per-sample", "jdoptim UPGrad")
        floor_ratio = interleaved_ratio(floor, plain, rounds)["ratio_median"]
        library_ratio = interleaved_ratio(library, floor, rounds)["ratio_median"]
        print(f"| {model_name} | {error:.1e} | {floor_ratio:.2f}× | {library_ratio:.2f}× |")


if __name__ == "__main__":
    main()
