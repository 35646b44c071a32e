r"""The analytic floor of a task-loss JD step on the real models: the engine's products, no more.

Issue 15 asks a task-loss JD step on GPT-2, Llama, ViT and ResNet-GN to cost at most 1.1× the
engine's *analytic floor*: the same arithmetic with none of the step's bookkeeping, as
:mod:`benchmarks.hand_fused` measures it for the MLP. This module is that floor for the models
of :mod:`benchmarks.test_bench_models`. It knows the layer types (and nothing of jdoptim's
step): forward hooks record the input ``X`` and output ``Y`` of every ``Linear``,
transformers' ``Conv1D``, ``Conv2d``, ``Embedding``, ``LayerNorm``, ``GroupNorm`` and RMSNorm
(a module with ``variance_epsilon``); the other parameters (ViT's class token and position
embedding) are *loose*. With ``T`` task losses:

* one vmapped backward with rows ``e_k`` gives ``D_k = ∂ℓ_k/∂Y`` at every recorded output and
  ``∂ℓ_k/∂θ`` for the loose parameters;
* a Linear-like layer (``Linear``, ``Conv1D``, ``Conv2d`` after im2col) with inputs ``a_s`` and
  output gradients ``D_{k,s}`` over its positions ``s`` contributes
  ``G_kl = Σ_{s,r} (⟨a_s, a_r⟩ + 1) ⟨D_{k,s}, D_{l,r}⟩`` by the kernel contraction
  (:func:`jdoptim.autogram.rules.linear_gramian`) where the engine's cost model picks it, with
  the update ``(Σ_k w_k D_k)ᵀ A``; elsewhere by its explicit rows, as below;
* an embedding's rows are its output gradients summed by token (``index_add``); a norm's affine
  rows are ``Σ_s D_{k,s} ⊙ n(x)_s`` and ``Σ_s D_{k,s}`` (``n(x)`` the normalised input,
  from what the norm's autograd node saved, read in the hook as the engine does: a LayerNorm's
  or GroupNorm's ``μ, 1/σ``, an RMS norm's ``n(x)`` from its last product ``γ ⊙ n(x)``);
  loose parameters' rows come from the backward; a parameter used by several calls (GPT-2's
  tied ``wte``/``lm_head``) sums its calls' explicit rows; these rows, side by side in one
  matrix ``R`` that the step reuses (:class:`RowsMatrix`, as the engine holds them), give
  ``G = R Rᵀ`` and the update ``Rᵀ w``, one product each;
* ``w = W(G)`` by UPGrad's weighting, then the optimizer's step.

:func:`check_against_library` gives the losses of one float64 forward to this step and to the
library's ``JDOptimizer`` and asserts that the two Gramians and ``.grad`` agree; :func:`main`
checks each model once and then times ``JDOptimizer`` against this floor, interleaved
(:func:`benchmarks.interleave.interleaved_ratio`).

Run: ``PYTHONPATH=$PWD python benchmarks/hand_fused_models.py`` (``BENCH_TINY=1`` for a smoke
run; ``--large`` adds the 6-layer GPT-2; ``BENCH_THREADS`` sets the threads, 2 by default).
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.interleave import interleaved_ratio
from benchmarks.test_bench_models import MODELS, THREADS, TINY, build, make_step
from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram._held_rows import split_as
from jdoptim.autogram.rules import linear_gramian, qualified_name
from jdoptim.autogram.rules._contraction import takes_contraction
from jdoptim.linalg.gramian import gram_matrix
from jdoptim.updates.base import weigh

_CONV1D = "transformers.pytorch_utils.Conv1D"
TASK_SETTINGS = ("2 tasks", "8 tasks")


def layer_kind(module: nn.Module) -> str | None:
    """How the floor differentiates ``module``'s direct parameters, or ``None`` if it has no
    rule here (its parameters are then loose)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if any(qualified_name(k) == _CONV1D for k in type(module).__mro__):
        return "conv1d"
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "conv2d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or hasattr(module, "variance_epsilon"):
        return "norm"
    return None


@dataclass
class Recorded:
    module: nn.Module
    kind: str
    x: Tensor
    y: Tensor
    #: what the norm's autograd node saved: an RMS norm's ``n(x)`` (its last product
    #: ``γ ⊙ n(x)``), or a LayerNorm's or GroupNorm's ``(μ, 1/σ)`` (else ``None``)
    saved: Tensor | tuple[Tensor, Tensor] | None = None


def _saved_normalisation(module: nn.Module, output: Tensor) -> Tensor | tuple | None:
    """What the norm's node saved that gives ``n(x)`` without recomputing the norm."""
    node = output.grad_fn
    name = type(node).__name__
    if name in ("NativeLayerNormBackward0", "NativeGroupNormBackward0"):
        return node._saved_result1, node._saved_result2
    if not hasattr(module, "variance_epsilon") or name != "MulBackward0":
        return None
    first = getattr(node.next_functions[0][0], "variable", None)
    return node._saved_other if first is module.weight else node._saved_self


def _linear_factors(call: Recorded, d: Tensor) -> tuple[Tensor, Tensor]:
    """``A`` ``[S, d]`` and ``D`` ``[T, S, o]`` of a Linear-like call (``Conv2d`` by im2col)."""
    t = d.shape[0]
    if call.kind != "conv2d":
        return call.x.reshape(-1, call.x.shape[-1]), d.reshape(t, -1, d.shape[-1])
    m = call.module
    cols = F.unfold(call.x, m.kernel_size, m.dilation, m.padding, m.stride)  # [N, Ckk, L]
    a = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return a, d.flatten(3).transpose(2, 3).reshape(t, -1, d.shape[2])


def _normalised(call: Recorded) -> tuple[Tensor, tuple[int, ...]]:
    """``n(x)`` of a norm call and the dimensions its affine rows sum over."""
    m, x = call.module, call.x
    if isinstance(call.saved, Tensor):
        return call.saved, tuple(range(x.dim() - 1))
    if call.saved is not None:  # (μ, 1/σ) of each group
        mean, rstd = call.saved
        if isinstance(m, nn.GroupNorm):
            grouped = x.reshape(x.shape[0], m.num_groups, -1)
            n = ((grouped - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)).reshape(x.shape)
            return n, (0, *range(2, x.dim()))
        return (x - mean) * rstd, tuple(range(x.dim() - len(m.normalized_shape)))
    if isinstance(m, nn.GroupNorm):
        return F.group_norm(x, m.num_groups, eps=m.eps), (0, *range(2, x.dim()))
    if isinstance(m, nn.LayerNorm):
        n = F.layer_norm(x, m.normalized_shape, eps=m.eps)
        return n, tuple(range(x.dim() - len(m.normalized_shape)))
    h = x.float()
    n = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + m.variance_epsilon)).to(x.dtype)
    return n, tuple(range(x.dim() - 1))


def explicit_rows(call: Recorded, d: Tensor) -> dict[str, Tensor]:
    """Rows ``[T, *p.shape]`` of the call's direct parameters, by name."""
    m, t = call.module, d.shape[0]
    if call.kind == "embedding":
        flat = d.reshape(t, -1, d.shape[-1])
        rows = torch.zeros((t, *m.weight.shape), dtype=d.dtype)
        return {"weight": rows.index_add_(1, call.x.reshape(-1), flat)}
    if call.kind == "norm":
        n, dims = _normalised(call)
        out = {"weight": (d * n).sum(tuple(k + 1 for k in dims))}
        if getattr(m, "bias", None) is not None:
            out["bias"] = d.sum(tuple(k + 1 for k in dims))
        return out
    if call.kind == "conv2d" and d.shape[-1] * d.shape[-2] >= 128:  # as the library's rule
        return _conv_rows_direct(call, d)
    a, dd = _linear_factors(call, d)
    weight = torch.einsum("kso,sd->kod", dd, a)
    if call.kind == "conv1d":
        weight = weight.transpose(1, 2)
    out = {"weight": weight.reshape(t, *m.weight.shape)}
    if getattr(m, "bias", None) is not None:
        out["bias"] = dd.sum(1)
    return out


def conv_weight_grad(call: Recorded, grad: Tensor, x: Tensor) -> Tensor:
    """A ``Conv2d`` call's weight gradient for the output gradient ``grad`` and input ``x``, from
    its own weight-gradient kernel (no im2col)."""
    m = call.module
    return torch.ops.aten.convolution_backward(
        grad,
        x,
        m.weight.detach(),
        None,
        list(m.stride),
        list(m.padding),
        list(m.dilation),
        False,
        [0, 0],
        m.groups,
        [False, True, False],
    )[1]


def _conv_rows_direct(call: Recorded, d: Tensor) -> dict[str, Tensor]:
    """A ``Conv2d``'s rows from its own weight-gradient kernel, vmapped over the ``T`` rows
    (no im2col): the faster products on layers with many output positions."""
    out = {"weight": torch.vmap(lambda grad: conv_weight_grad(call, grad, call.x))(d)}
    if getattr(call.module, "bias", None) is not None:
        out["bias"] = d.sum((1, 3, 4))
    return out


class RowsMatrix:
    """Explicit rows of several parameters side by side in one matrix ``R`` (``[rows, Σ n_p]``),
    kept from step to step (a fresh one per step would be fresh pages from the system on CPU),
    for ``G = R Rᵀ`` and the update ``Rᵀ w`` in one product each."""

    def __init__(self) -> None:
        self.flat: Tensor | None = None
        #: the matrix and its column blocks, made once per layout (as the library's
        #: ``RowsBuffer`` keeps them: each view made afresh is a tensor operation)
        self.views: dict[tuple, tuple[Tensor, list[Tensor]]] = {}

    def fill(self, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """``R`` from ``(parameter, rows [count, n_p])`` pairs."""
        count, dtype = pairs[0][1].shape[0], pairs[0][1].dtype
        width = sum(p.numel() for p, _ in pairs)
        if self.flat is None or self.flat.numel() < count * width or self.flat.dtype != dtype:
            self.flat = torch.empty(count * width, dtype=dtype)
            self.views.clear()
        key = (count, width, tuple(rows.shape for _, rows in pairs))
        if key not in self.views:
            matrix = self.flat[: count * width].view(count, width)
            blocks, start = [], 0
            for _, rows in pairs:
                n = rows[0].numel()
                blocks.append(matrix[:, start : start + n].view(rows.shape))
                start += n
            self.views[key] = (matrix, blocks)
        matrix, blocks = self.views[key]
        for block, (_, rows) in zip(blocks, pairs):
            block.copy_(rows)
        return matrix

    @staticmethod
    def apply(weights: Tensor, params: list[Tensor], matrix: Tensor) -> None:
        """``.grad`` of each parameter from ``wᵀ R``."""
        update = weights.reshape(1, -1).to(matrix.dtype) @ matrix
        for p, part in zip(params, split_as(update[0], params)):  # (as the library splits it)
            p.grad = part.to(p.dtype)


class RecordingStep:
    """What both floors share: forward hooks recording every call of a layer this floor knows
    (:func:`layer_kind`) that has a trainable direct parameter, the optimizer, UPGrad's weighting,
    and ``zero_grad``/``step`` around a subclass's :meth:`gradients`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.weighting = UPGradWeighting()
        self.held = RowsMatrix()
        self.calls: list[Recorded] = []
        #: how many recorded layers hold each parameter (by id)
        self.owners: Counter[int] = Counter()
        for module in model.modules():
            kind = layer_kind(module)
            direct = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if kind is None or not direct:
                continue
            module.register_forward_hook(self._recorder(kind))
            self.owners.update(id(p) for p in direct)

    def _recorder(self, kind: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if torch.is_grad_enabled():
                saved = _saved_normalisation(module, output) if kind == "norm" else None
                self.calls.append(Recorded(module, kind, args[0].detach(), output, saved))

        return hook

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        self.calls.clear()

    def step(self, losses: Tensor) -> None:
        self.gradients(losses)
        self.optimizer.step()

    def gradients(self, losses: Tensor, retain_graph: bool = False) -> Tensor:
        """Sets every parameter's ``.grad`` to ``Jᵀ w``; returns ``G``."""
        raise NotImplementedError


class HandFusedTaskStep(RecordingStep):
    """``step(losses)`` with ``losses`` a ``[T]`` vector of task losses; see the module docs."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        super().__init__(model, optimizer)
        params = list(dict.fromkeys(p for p in model.parameters() if p.requires_grad))
        self.loose = [p for p in params if id(p) not in self.owners]

    def gradients(self, losses: Tensor, retain_graph: bool = False) -> Tensor:
        """Sets every parameter's ``.grad`` to ``Jᵀ w``; returns ``G``."""
        t = losses.shape[0]
        outputs = [c.y for c in self.calls]
        eye = torch.eye(t, dtype=losses.dtype)
        grads = torch.autograd.grad(
            losses,
            outputs + self.loose,
            eye,
            retain_graph,
            is_grads_batched=True,
            allow_unused=True,
        )
        grads = [
            torch.zeros((t, *x.shape), dtype=x.dtype) if g is None else g
            for g, x in zip(grads, outputs + self.loose)
        ]
        with torch.no_grad():
            gramian, rows, fused = self._gramian(grads, t)
            params = [p for p, _ in rows.values()]
            matrix = self.held.fill(list(rows.values())) if rows else None
            if matrix is not None:
                gramian += gram_matrix(matrix)
            weights = weigh(self.weighting, gramian).to(losses.dtype)
            if matrix is not None:
                self.held.apply(weights, params, matrix)
            self._apply(weights, fused)
        return gramian

    def _gramian(self, grads: list[Tensor], t: int):
        """``G`` of the kernel-contracted Linear-like calls, the explicit rows by parameter
        (their Gram matrix not yet added), and those calls."""
        rows: dict[int, tuple[Tensor, Tensor]] = {}  # id(p) → (p, rows [T, n])
        fused: list[tuple[nn.Module, str, Tensor, Tensor]] = []
        gramian = torch.zeros(t, t, dtype=grads[0].dtype if grads else torch.float32)
        uses = Counter(id(p) for c in self.calls for p in c.module.parameters(recurse=False))
        tied = {i for i, n in uses.items() if n > 1}  # tied weights, modules called twice
        for call, d in zip(self.calls, grads):
            direct = dict(call.module.named_parameters(recurse=False))
            linear_like = call.kind in ("linear", "conv1d", "conv2d")
            if linear_like and not any(id(p) in tied for p in direct.values()):
                a, dd = _linear_factors(call, d)
                with_bias = getattr(call.module, "bias", None) is not None
                (s_, width), o = a.shape, dd.shape[-1]
                if takes_contraction(1, s_, t, width + with_bias, o):
                    gramian += linear_gramian(a[None], dd[:, None], with_bias).reshape(t, t)
                    fused.append((call.module, call.kind, a, dd))
                    continue
            for name, r in explicit_rows(call, d).items():
                p = direct[name]
                old = rows.get(id(p))
                rows[id(p)] = (p, r.reshape(t, -1) + (0 if old is None else old[1]))
        for p, g in zip(self.loose, grads[len(self.calls) :]):
            rows[id(p)] = (p, g.reshape(t, -1))
        return gramian, rows, fused

    @staticmethod
    def _apply(weights: Tensor, fused: list) -> None:
        for module, kind, a, dd in fused:
            dw = torch.tensordot(weights, dd, dims=1)  # [S, o]
            grad = a.T @ dw if kind == "conv1d" else dw.T @ a
            module.weight.grad = grad.reshape(module.weight.shape)
            if getattr(module, "bias", None) is not None:
                module.bias.grad = dw.sum(0)


def check_against_library(model_name: str, setting: str) -> float:
    """One float64 forward, its losses given to the floor and to a ``JDOptimizer`` (UPGrad,
    ``scope="all"``): the floor's Gramian must equal the library's and the ``.grad`` it sets the
    library's (relative max-entry errors ``< 1e-9``, the ``.grad`` one relative to the largest
    entry; the Gramian's is returned). Raises ``AssertionError`` otherwise."""
    model, losses_of = build(model_name, setting, torch.float64)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    fused = HandFusedTaskStep(model, torch.optim.SGD(params, lr=0.0))
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=None, scope="all"
    )
    losses = losses_of(model)
    gramian = fused.gradients(losses, retain_graph=True)
    floor_grads = torch.cat([p.grad.flatten() for p in params])
    opt.zero_grad()
    record = opt.step(list(losses.unbind()))
    assert record.gramian is not None
    library_grads = torch.cat([p.grad.flatten() for p in params])
    expected = record.gramian.double()
    error = ((gramian - expected).abs().max() / expected.abs().max()).item()
    assert error < 1e-9, f"{model_name}, {setting}: floor and library Gramians differ ({error:.2g})"
    grad_error = (floor_grads - library_grads).abs().max() / library_grads.abs().max()
    assert grad_error < 1e-9, f"{model_name}, {setting}: .grad differs ({grad_error:.2g})"
    return error


def make_floor_step(model_name: str, setting: str, step_class: type[RecordingStep] | None = None):
    """A closure running one floor step (Adam), as :func:`make_step` does for the others;
    ``step_class``: the hand-written step (default :class:`HandFusedTaskStep`; the per-sample
    floor passes its own)."""
    model, losses = build(model_name, setting)
    model.train()
    step_class = step_class or HandFusedTaskStep
    fused = step_class(model, torch.optim.Adam(model.parameters(), lr=1e-4))

    def floor() -> None:
        fused.zero_grad()
        fused.step(losses(model))

    return floor


def main() -> None:
    torch.set_num_threads(THREADS)
    rounds = 3 if TINY else 30
    print("| model | setting | Gramian check (float64) | floor / plain | JDOptimizer / floor |")
    print("|---|---|---|---|---|")
    for model_name in MODELS:
        for setting in TASK_SETTINGS:
            error = check_against_library(model_name, setting)
            floor = make_floor_step(model_name, setting)
            plain = make_step(model_name, setting, "plain")
            library = make_step(model_name, setting, "jdoptim UPGrad")
            floor_ratio = interleaved_ratio(floor, plain, rounds)["ratio_median"]
            library_ratio = interleaved_ratio(library, floor, rounds)["ratio_median"]
            print(
                f"| {model_name} | {setting} | {error:.1e} | {floor_ratio:.2f}× | "
                f"{library_ratio:.2f}× |"
            )


if __name__ == "__main__":
    main()
