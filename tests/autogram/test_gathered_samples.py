"""Calls on entries gathered from the samples': mixture-of-experts experts called on the tokens
routed to them, adapters called on the samples of one language.

A token-choice mixture of experts (Switch, NLLB-MoE, fairseq's, most hand-written ones) calls
each expert on ``h[index]`` (or ``h[mask]``, ``h.index_select(0, index)``) of the batch's
tokens and adds the results back; each expert's rows then belong to the samples their tokens
came from, in any order and any number per sample. Each case is checked against the explicit
Jacobian of the same losses (same forward, same routing, same dropout masks) with the engine's
route warnings as errors: exact on the per-sample path, not by one backward row per loss.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram._sample_trace import Held, traced_sample_dim

from ._oracle import explicit_jacobian
from ._same_losses import LAYOUT_BATCH_DIM, check_gramian, check_on_fast_path, layout_losses


class _ScaledExpert(nn.Module):
    """An expert with a parameter of its own and dropout (no layer rule: the generic rule
    re-runs the call as it was made, replaying its draws)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(F.linear(x, self.weight), 0.2, self.training) * self.scale


class _MixtureOfExperts(nn.Module):
    """Top-``k`` token routing over ``[b, s, d]``: ``gather`` picks how an expert takes its
    tokens (``index`` of the flat tokens, boolean ``mask`` over ``[b, s]``, ``index_select``);
    the results are weighted by the router and added back (``index_add_`` / ``index_put``)."""

    def __init__(self, d: int, experts: int, top: int, gather: str, own: bool) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(
            _ScaledExpert(d)
            if own and e == 0
            else nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.1), nn.Linear(2 * d, d))
            for e in range(experts)
        )
        self.top, self.gather = top, gather

    def forward(self, h: Tensor) -> Tensor:  # [b, s, d]
        b, s, d = h.shape
        probs = self.router(h).softmax(-1)
        weights, chosen = probs.topk(self.top, -1)  # [b, s, top]
        flat, out = h.reshape(b * s, d), torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            mask = (chosen == e).any(-1)  # [b, s]
            weight = (weights * (chosen == e)).sum(-1)  # [b, s]
            if self.gather == "mask":
                out[mask] = expert(h[mask]) * weight[mask, None]
                continue
            index = mask.reshape(-1).nonzero().squeeze(1)
            taken = flat[index] if self.gather == "index" else flat.index_select(0, index)
            added = expert(taken) * weight.reshape(-1)[index, None]
            out = out + torch.zeros_like(flat).index_add(0, index, added).reshape(b, s, d)
        return h + out


class _MoEModel(nn.Module):
    def __init__(self, gather: str, top: int = 2, own: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.moe = _MixtureOfExperts(8, 3, top, gather, own)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, s, 5] → [b, 2]
        return self.head(torch.tanh(self.moe(self.norm(self.embed(x)))).mean(1))


class _ParallelExperts(nn.Module):
    """JetMoE's experts in one module (no layer rule): the tokens come sorted by expert, with
    each expert's count, and each expert's block goes through its own weight."""

    def __init__(self, experts: int, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, d_out, d_in) / d_in**0.5)

    def forward(self, x: Tensor, sizes: list[int]) -> Tensor:
        blocks = x.split(sizes, dim=0)
        return torch.cat([F.linear(block, w) for block, w in zip(blocks, self.weight)])


class _SortedMoE(nn.Module):
    """JetMoE's routing: the top-``k`` choices of the ``[b·s]`` tokens sorted by expert, the
    tokens gathered in that order, a gated unit between two parallel-expert projections (its
    halves taken by ``chunk``), the results added back by ``index_add``."""

    def __init__(self, d: int = 8, experts: int = 3, top: int = 2) -> None:
        super().__init__()
        self.embed, self.router = nn.Linear(5, d), nn.Linear(d, experts)
        self.input_linear = _ParallelExperts(experts, d, 2 * d)
        self.output_linear = _ParallelExperts(experts, d, d)
        self.head = nn.Linear(d, 2)
        self.experts, self.top = experts, top

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        b, s, d = h.shape
        flat = h.reshape(b * s, d)
        gates, chosen = self.router(flat).softmax(-1).topk(self.top, -1)  # [b·s, top]
        order = chosen.flatten().sort(stable=True).indices
        tokens = order // self.top
        sizes = torch.bincount(chosen.flatten(), minlength=self.experts).tolist()
        hidden = self.input_linear(flat[tokens], sizes)
        gate, up = hidden.chunk(2, dim=-1)
        out = self.output_linear(F.silu(gate) * up, sizes) * gates.flatten()[order, None]
        merged = torch.zeros_like(flat).index_add(0, tokens, out).reshape(b, s, d)
        return self.head(torch.tanh(h + merged).mean(1))


class _LanguageAdapters(nn.Module):
    """X-MOD's adapters: each sample goes through the adapter of its language,
    ``h[lang == k]`` (a language may have no sample in the batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 8)) for _ in range(3)
        )
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)  # [b, s, 8]
        lang = torch.arange(x.shape[0]) % 2  # languages 0 and 1; 2 has no sample
        adapted = torch.zeros_like(h)
        for k, adapter in enumerate(self.adapters):
            adapted[lang == k] = adapter(h[lang == k])
        return self.head(torch.tanh(h + adapted).mean(1))


_MODELS = {
    "top-2 index": lambda: _MoEModel("index"),
    "top-1 mask": lambda: _MoEModel("mask", top=1),
    "top-2 index_select": lambda: _MoEModel("index_select"),
    "expert without a rule": lambda: _MoEModel("index", own=True),
    "language adapters": _LanguageAdapters,
    "sorted tokens, parallel experts": _SortedMoE,
}


@pytest.mark.parametrize(
    "layout, low_memory",
    [(layout, False) for layout in LAYOUT_BATCH_DIM] + [("per-sample", True)],
)
@pytest.mark.parametrize("batch", [3, 4])
@pytest.mark.parametrize("name", list(_MODELS))
def test_gathered_entries_on_the_per_sample_path(
    name: str, batch: int, layout: str, low_memory: bool
) -> None:
    torch.manual_seed(0)
    model = _MODELS[name]().double().train()
    x = torch.randn(batch, 6, 5, dtype=torch.float64)
    losses = layout_losses(model, x, layout)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[layout], low_memory=low_memory)


@pytest.mark.parametrize(
    "name", ["top-2 index", "top-1 mask", "language adapters", "sorted tokens, parallel experts"]
)
def test_each_forward_routes_anew(name: str) -> None:
    """One engine and one optimizer over steps whose routing differs with the same shapes
    (the batch reversed: every expert gets as many tokens, from other samples): each step's
    Gramian and ``.grad`` are its own, none taken from an earlier step's layout."""
    torch.manual_seed(0)
    model = _MODELS[name]().double().train()
    x = torch.randn(4, 6, 5, dtype=torch.float64)
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        with Engine(model, batch_dim=0) as engine:
            for inputs in [x, x.flip(0), x, x[[1, 3, 0, 2]]]:
                losses = model(inputs).pow(2).sum(1)
                jacobian = explicit_jacobian(losses, params)
                expected = UPGrad().weighting(jacobian @ jacobian.T) @ jacobian
                gramian = engine.compute_gramian(losses, retain_graph=True)
                torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
                opt.zero_grad()
                opt.step(losses)
                actual = torch.cat([p.grad.reshape(-1) for p in params])
                torch.testing.assert_close(actual, expected, rtol=1e-8, atol=1e-12)


def test_gathers_under_checkpoint_are_not_unpacked() -> None:
    """The trace reads a gather's indices, except where saved-tensor hooks packed them: in a
    non-reentrant checkpointed segment, unpacking them would re-run the segment's forward."""
    base = torch.randn(6, 4, requires_grad=True) * 1  # two samples of three entries each
    runs = []

    def segment(t: Tensor) -> Tensor:
        runs.append(1)
        return t[torch.tensor([0, 4, 5])]

    def source_dim(node: object, nr: int) -> tuple[Held, tuple[int, ...]] | None:
        return (Held(0, 3), (6, 4)) if node is base.grad_fn else None

    held = traced_sample_dim(segment(base), source_dim)
    assert held is not None and held.rows is not None
    assert held.dim == 0 and held.rows.tolist() == [0, 1, 1]
    checkpointed = torch.utils.checkpoint.checkpoint(segment, base, use_reentrant=False)
    assert traced_sample_dim(checkpointed, source_dim) is None
    assert len(runs) == 2  # (no third run: nothing was unpacked)


class _Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, h: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(self.inner, h, use_reentrant=False)


@pytest.mark.parametrize("layout", list(LAYOUT_BATCH_DIM))
def test_checkpointed_mixture_of_experts_stays_exact(layout: str) -> None:
    """The routing inside a checkpointed segment: exact, by whichever route the check picks."""
    torch.manual_seed(0)
    model = _MoEModel("index").double().train()
    model.moe = _Checkpointed(model.moe)  # type: ignore[assignment]
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineRouteWarning)
        check_gramian(model, layout_losses(model, x, layout), LAYOUT_BATCH_DIM[layout], 1e-9)


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low memory"])
@pytest.mark.parametrize("name", ["top-2 index", "top-1 mask", "sorted tokens, parallel experts"])
def test_new_token_counts_keep_the_checked_route(name: str, low_memory: bool) -> None:
    """New inputs at every step give the experts other token counts: each step exact, and only
    the first one checked (a step that differs from a checked structure by its experts' token
    counts only takes that structure's route: one route remembered)."""
    torch.manual_seed(0)
    model = _MODELS[name]().double().train()
    params = list(model.parameters())
    counts, seen = set(), []
    for module in model.modules():
        if isinstance(module, (nn.Linear, _ParallelExperts)):
            module.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        with Engine(model, batch_dim=0, low_memory=low_memory) as engine:
            for _ in range(6):
                x = torch.randn(4, 6, 5, dtype=torch.float64)
                seen.clear()
                losses = model(x).pow(2).sum(1)
                jacobian = explicit_jacobian(losses, params)
                step = engine.step(losses, params, [], per_sample=True)
                with torch.no_grad():
                    gramian = step.gramian()
                torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)
                counts.add(tuple(seen))
                seen.clear()
                if low_memory:
                    step.release_graph(losses)
            if name != "sorted tokens, parallel experts":  # (its shapes: b·s·top rows always)
                assert len(counts) > 1  # (the routing did change the calls' shapes)
            assert len(engine._routes) == 1
