r"""The analytic floor of a *per-sample* JD step on a real model: the engine's products, no more.

:mod:`benchmarks.hand_fused_models` is the floor of a task-loss step. This is the same for
per-sample losses ``ℓ_i`` (one per sample, ``batch_dim=0``), written for models whose every
parameter sits in a ``Linear``, transformers' ``Conv1D``, a ``Conv2d``, an ``Embedding`` or a norm,
none tied and none used by two calls (Llama small and ResNet-18 GN here; GPT-2's tied,
sample-shared position embedding and ViT's class token would need the engine's own machinery).
Forward hooks record every such call's input ``X`` and output ``Y``; then

* one ordinary backward with all-ones output weights gives ``D = ∂(Σᵢ ℓᵢ)/∂Y``, whose sample-``i``
  slice is ``∂ℓᵢ/∂Y_i``;
* a ``Conv2d`` contributes the Gram matrix of its per-sample rows, from its weight-gradient
  kernel vmapped over the samples (from 256 output positions per image, as the library's rule),
  else as a Linear-like layer on its im2col columns;
* a Linear-like layer contributes ``G_ij = Σ_{s,r} (⟨a_{is}, a_{jr}⟩ + 1) ⟨D_{is}, D_{jr}⟩`` by the
  engine's public contraction helper (:func:`jdoptim.autogram.rules.linear_gramian`, kernel or
  explicit rows by cost, as the engine picks); an embedding ``Σ_{s,r} [idx_{is} = idx_{jr}]
  ⟨D_{is}, D_{jr}⟩``; a norm's affine parameters their rows ``Σ_s D_{is} ⊙ n(x)_{is}`` and
  ``Σ_s D_{is}``;
* ``w = W(G)`` by UPGrad's weighting on the ``b × b`` Gramian;
* the update from the weighted ``D`` (``Σᵢ wᵢ D_i``), layer by layer, then the optimizer's step.

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
from jdoptim.updates.base import weigh

#: the models this floor covers (see the module docstring)
PER_SAMPLE_MODELS = ("llama-small", "resnet18-gn")
#: per-sample convolution rows from the weight-gradient kernel from this many output positions per
#: image up, below it im2col and the Linear contraction (the library's conv rule's threshold)
DIRECT_CONV_POSITIONS = 256


class HandFusedPerSampleStep(RecordingStep):
    """``step(losses)`` with ``losses`` a ``[b]`` vector of per-sample losses."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]
        owners = self.owners
        if any(id(p) not in owners for p in params) or any(n > 1 for n in owners.values()):
            raise ValueError("this floor needs every parameter in exactly one recorded layer")

    def gradients(self, losses: Tensor, retain_graph: bool = False) -> Tensor:
        """Sets every parameter's ``.grad`` to ``Jᵀ w``; returns ``G``."""
        b = losses.shape[0]
        if len({id(c.module) for c in self.calls}) != len(self.calls):
            raise ValueError("this floor needs each recorded layer called once per forward")
        outputs = [c.y for c in self.calls]
        grads = torch.autograd.grad(losses, outputs, torch.ones_like(losses), retain_graph)
        with torch.no_grad():
            gramian = torch.zeros(b, b, dtype=grads[0].dtype)
            for call, d in zip(self.calls, grads):
                gramian += _call_gramian(call, d)
            weights = weigh(self.weighting, gramian).to(losses.dtype)
            for call, d in zip(self.calls, grads):
                _set_update(call, d * weights.view(b, *(1,) * (d.dim() - 1)))
        return gramian


def _conv_gramian(call: Recorded, d: Tensor) -> Tensor:
    """A ``Conv2d``'s per-sample Gramian: rows from its weight-gradient kernel vmapped over the
    samples on large maps, else im2col and the Linear contraction (as the library's rule)."""
    m, b = call.module, d.shape[0]
    with_bias = m.bias is not None
    if d.shape[-1] * d.shape[-2] >= DIRECT_CONV_POSITIONS:  # (layer_kind: groups == 1)
        rows = torch.vmap(lambda g, x: conv_weight_grad(call, g[None], x[None]))(d, call.x)
        flat = rows.reshape(b, -1)
        if with_bias:
            flat = torch.cat([flat, d.sum((2, 3))], dim=1)
        return flat @ flat.T
    cols = F.unfold(call.x, m.kernel_size, m.dilation, m.padding, m.stride)  # [b, Ckk, L]
    a = cols.transpose(1, 2)
    dd = d.flatten(2).transpose(1, 2).unsqueeze(0)  # [1, b, L, o]
    return linear_gramian(a, dd, with_bias).reshape(b, b)


def _call_gramian(call: Recorded, d: Tensor) -> Tensor:
    """The call's per-sample Gramian contribution ``[b, b]``."""
    m, b = call.module, d.shape[0]
    if call.kind == "conv2d":
        return _conv_gramian(call, d)
    if call.kind in ("linear", "conv1d"):
        a = call.x.reshape(b, -1, call.x.shape[-1])
        dd = d.reshape(1, b, -1, d.shape[-1])
        with_bias = getattr(m, "bias", None) is not None
        return linear_gramian(a, dd, with_bias).reshape(b, b)
    if call.kind == "embedding":
        index = call.x.reshape(-1)
        flat = d.reshape(index.shape[0], -1)
        same = index[:, None] == index[None, :]
        products = (flat @ flat.T) * same.to(flat.dtype)
        return products.reshape(b, -1, b, products.shape[0] // b).sum((1, 3))
    n, dims = _normalised(call)
    per_sample = tuple(k for k in dims if k != 0)  # the dimensions summed within a sample
    rows = [(d * n).sum(per_sample).reshape(b, -1)]
    if getattr(m, "bias", None) is not None:
        rows.append(d.sum(per_sample).reshape(b, -1))
    flat = torch.cat(rows, dim=1)
    return flat @ flat.T


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
    fused = HandFusedPerSampleStep(model, torch.optim.SGD(params, lr=0.0))
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


def make_per_sample_floor_step(model_name: str):
    """A closure running one per-sample floor step (Adam)."""
    return make_floor_step(model_name, "per-sample", HandFusedPerSampleStep)


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
