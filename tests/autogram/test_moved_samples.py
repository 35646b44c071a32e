"""Layers called on tensors whose samples were moved to another dimension, inside a batch-first
model: Longformer's and LED's self-attention transpose the ``[b, s, d]`` states to ``[s, b, d]``
and project them there (``batch_dim=0`` for the model, dimension 1 for those calls).

Each case is checked against the explicit Jacobian of the same losses (same forward, same
dropout masks) with the engine's route warnings as errors: the fast path is the one certified.
At ``s = 2b`` the ``[s, b, d]`` outputs also read as samples folded by two along dimension 0
(sample-major), which is wrong: the transposed input's graph says where the samples are.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine, EngineRouteWarning

from ._oracle import explicit_jacobian
from ._same_losses import (
    LAYOUT_BATCH_DIM,
    check_gramian,
    check_on_fast_path,
    layout_losses,
)


class _SequenceFirstAttention(nn.Module):
    """Batch-first in and out; inside, the projections run sequence-first, as Longformer's do.
    ``move`` picks how the samples are moved (``transpose`` or ``permute``); ``global_query``
    adds a projection of the first token only (``[1, b, d]``, divided in place)."""

    def __init__(self, d: int, move: str, global_query: bool) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.query_global = nn.Linear(d, d) if global_query else None
        self.out = nn.Linear(d, d)
        self.move = move

    def forward(self, h: Tensor) -> Tensor:  # h: [b, s, d]
        x = h.transpose(0, 1) if self.move == "transpose" else h.permute(1, 0, 2)
        q, k, v = self.query(x), self.key(x), self.value(x)  # [s, b, d]
        q /= math.sqrt(q.shape[-1])
        scores = torch.einsum("sbd,tbd->bst", q, k)
        if self.query_global is not None:
            first = x.new_zeros(1, *x.shape[1:])
            first[0] = x[0]  # [1, b, d]: one global token per sample
            g = self.query_global(first)
            g /= math.sqrt(g.shape[-1])
            scores = scores + torch.einsum("gbd,tbd->bgt", g, k)
        probs = F.dropout(scores.softmax(-1), 0.2, self.training)
        context = torch.einsum("bst,tbd->sbd", probs, v)  # sequence-first
        return self.out(context.transpose(0, 1))  # back to [b, s, d]


class _Model(nn.Module):
    def __init__(self, move: str = "transpose", global_query: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.attention = _SequenceFirstAttention(8, move, global_query)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, s, 5] → [b, 2]
        h = F.dropout(self.norm(self.embed(x)), 0.1, self.training)
        return self.head(torch.tanh(self.attention(h)).mean(1))


@pytest.mark.parametrize(
    "layout, low_memory",
    [(layout, False) for layout in LAYOUT_BATCH_DIM]
    + [("per-sample", True), ("batch x tasks", True)],
)
@pytest.mark.parametrize("batch, seq", [(3, 8), (4, 8), (4, 4)])
@pytest.mark.parametrize(
    "move, global_query", [("transpose", False), ("permute", False), ("transpose", True)]
)
def test_sequence_first_calls_in_a_batch_first_model(
    layout: str, batch: int, seq: int, move: str, global_query: bool, low_memory: bool
) -> None:
    """Engine Gramian and JDOptimizer .grad exact, without a route warning (at batch 4 the
    8-token ``[s, b, d]`` outputs also look folded by two along dimension 0; at ``s = b`` their
    sizes say nothing: the trace back to the LayerNorm's output, through dropout, does)."""
    torch.manual_seed(0)
    model = _Model(move, global_query).double().train()
    x = torch.randn(batch, seq, 5, dtype=torch.float64)
    losses = layout_losses(model, x, layout)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[layout], low_memory=low_memory)


class _RawSequenceFirst(nn.Module):
    """The sequence-first attention on the model's input itself: ``x.transpose(0, 1)`` has no
    graph to trace."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = _SequenceFirstAttention(5, "transpose", global_query=False)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.attention(x)).mean(1))


def test_untraceable_samples_at_sequence_as_long_as_the_batch_stay_exact() -> None:
    """At ``s = b`` the transposed input holds ``b`` entries along both leading dimensions, and
    it has no graph (the model's input): nothing says where the samples are, the outputs are
    read along ``batch_dim``, and the engine's check finds this on the first step and takes the
    exact route (warned)."""
    torch.manual_seed(0)
    model = _RawSequenceFirst().double().train()
    x = torch.randn(4, 4, 5, dtype=torch.float64)
    losses = layout_losses(model, x, "per-sample")
    with pytest.warns(EngineRouteWarning, match="attention"):
        check_gramian(model, losses, 0, rtol=1e-9)
    x = torch.randn(3, 4, 5, dtype=torch.float64)  # s ≠ b: read by the sizes, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        check_gramian(model, layout_losses(model, x, "per-sample"), 0, rtol=1e-9)


def test_moved_calls_keep_their_layout_over_steps() -> None:
    """The structure's layouts are remembered: three steps of one engine, each exact."""
    torch.manual_seed(0)
    model = _Model(global_query=True).double().train()
    x = torch.randn(4, 8, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        with Engine(model, batch_dim=0) as engine:
            for _ in range(3):
                losses = model(x).pow(2).sum(1)
                jacobian = explicit_jacobian(losses, list(model.parameters()))
                gramian = engine.compute_gramian(losses)
                torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-9, atol=1e-12)


class _ConvThenChannelNorm(nn.Module):
    """wav2vec2/data2vec-audio's feature encoder: a convolution, then a LayerNorm over the
    channels of ``h.transpose(-2, -1)`` (negative dimensions, saved by autograd as unsigned
    integers), transposed back; the samples stay along dimension 0."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, channels, 5, stride=2)
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, 1, L]
        h = self.norm(self.conv(x).transpose(-2, -1)).transpose(-2, -1)
        return self.head(F.gelu(h).mean(-1))


@pytest.mark.parametrize("layout", list(LAYOUT_BATCH_DIM))
def test_transposes_that_keep_the_samples_in_place(layout: str) -> None:
    """A transpose of the last two dimensions leaves the samples along 0, also when the
    channels equal the batch size (which once read the norm's samples along dimension 2)."""
    torch.manual_seed(0)
    model = _ConvThenChannelNorm(channels=4).double().train()
    x = torch.randn(4, 1, 21, dtype=torch.float64)
    losses = layout_losses(model, x, layout)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[layout])


class _TimeMajorInside(nn.Module):
    """A batch-first model around a time-major layer with PyTorch's defaults
    (``batch_first=False``), fed ``h.transpose(0, 1)`` and transposed back, as much code using
    ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` or ``nn.GRU`` does."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.embed = nn.Linear(5, 8)
        if kind == "attention":
            self.layer: nn.Module = nn.MultiheadAttention(8, 2, dropout=0.2)
        elif kind == "encoder layer":
            self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.2)
        else:
            self.layer = nn.GRU(8, 8, num_layers=2, dropout=0.2)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, s, 5] → [b, 2]
        h = F.dropout(torch.tanh(self.embed(x)), 0.1, self.training).transpose(0, 1)
        if self.kind == "attention":
            out, weights = self.layer(h, h, h)  # weights: [b, s, s]
            pooled = out.transpose(0, 1).mean(1) * (1 + weights.amax((1, 2)))[:, None]
        elif self.kind == "encoder layer":
            pooled = self.layer(h).transpose(0, 1).mean(1)
        else:
            out, last = self.layer(h)  # last: [layers, b, hidden]
            pooled = out.transpose(0, 1).mean(1) + last[-1]
        return self.head(pooled)


@pytest.mark.parametrize(
    "layout, low_memory",
    [(layout, False) for layout in LAYOUT_BATCH_DIM] + [("per-sample", True)],
)
@pytest.mark.parametrize("batch, seq", [(3, 5), (4, 8), (4, 4)])
@pytest.mark.parametrize("kind", ["attention", "encoder layer", "recurrent"])
def test_time_major_layers_in_a_batch_first_model(
    layout: str, low_memory: bool, batch: int, seq: int, kind: str
) -> None:
    """Accepted with ``batch_dim=0`` (they were refused, though the model is per-sample): the
    layer holds the samples along 1 as its ``batch_first=False`` says, the layers inside an
    encoder layer on ``[s, b, d]`` states are traced back to where they were transposed.
    Exact, without a route warning."""
    torch.manual_seed(0)
    model = _TimeMajorInside(kind).double().train()
    x = torch.randn(batch, seq, 5, dtype=torch.float64)
    losses = layout_losses(model, x, layout)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[layout], low_memory=low_memory)


class _FairseqAttention(nn.Module):
    """fairseq's (and FSMT's) attention, sequence-first in and out (``[s, b, d]``): the heads
    folded into the batch by a view (``[s, b·h, e]``), ``bmm`` over ``[b·h, s, e]`` (or
    ``scaled_dot_product_attention`` over ``[b, h, s, e]``), the result viewed back to
    ``[s, b, d]`` and projected there: the projections' inputs hold the samples along 1, which
    only a trace through views and batched products shows (at ``s = 2b`` the sizes also read
    as samples folded by two along 0)."""

    def __init__(self, d: int, heads: int, sdpa: bool) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        self.heads, self.sdpa = heads, sdpa

    def forward(self, query: Tensor, key: Tensor) -> Tensor:  # [t, b, d], [s, b, d]
        t, b, d = query.shape
        h, e = self.heads, d // self.heads
        q, k, v = self.q_proj(query) * e**-0.5, self.k_proj(key), self.v_proj(key)
        q, k = (torch.cat([z[..., d // 2 :], -z[..., : d // 2]], -1) for z in (q, k))  # (cat)
        v, _ = v.chunk(2, -1)
        v = v.repeat(1, 1, 2)  # (tiled along the features)
        if self.sdpa:
            q, k, v = (z.reshape(-1, b, h, e).permute(1, 2, 0, 3) for z in (q, k, v))
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, scale=1.0)
            context = context.permute(2, 0, 1, 3).reshape(t, b, d)
        else:
            q, k, v = (z.reshape(-1, b * h, e).transpose(0, 1) for z in (q, k, v))
            probs = F.dropout(torch.bmm(q, k.transpose(1, 2)).softmax(-1), 0.1, self.training)
            context = torch.bmm(probs, v).transpose(0, 1).contiguous().view(t, b, d)
        return self.out_proj(context)


class _FairseqEncoderDecoder(nn.Module):
    """Batch-first in and out, sequence-first inside (as FSMT): an encoder layer over ``x``
    (``[b, s, 5]``), its output handed back batch-first and transposed again by the decoder,
    whose cross-attention projects it (a producer traced through two transposes)."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.embed, self.target_embed = nn.Linear(5, 8), nn.Linear(5, 8)
        self.self_attn = _FairseqAttention(8, 2, sdpa)
        self.norm, self.cross_norm = nn.LayerNorm(8), nn.LayerNorm(8)
        self.cross_attn = _FairseqAttention(8, 2, sdpa)
        self.head = nn.Linear(8, 2)

    def forward(self, x: Tensor) -> Tensor:  # [b, s, 5] → [b, 2]
        h = self.embed(x).transpose(0, 1)  # [s, b, d]
        h = self.norm(h + F.dropout(self.self_attn(h, h), 0.1, self.training))
        memory = h.transpose(0, 1)  # the encoder's output, batch-first
        y = self.target_embed(x[:, :3].flip(1)).transpose(0, 1)  # [3, b, d]
        y = self.cross_norm(y + self.cross_attn(y, memory.transpose(0, 1)))
        return self.head(torch.tanh(y).mean(0))


@pytest.mark.parametrize(
    "layout, low_memory",
    [(layout, False) for layout in LAYOUT_BATCH_DIM] + [("per-sample", True)],
)
@pytest.mark.parametrize("batch, seq", [(3, 8), (4, 8), (4, 4), (2, 8)])
@pytest.mark.parametrize("sdpa", [False, True], ids=["bmm", "sdpa"])
def test_sequence_first_model_with_views_and_batched_products(
    layout: str, batch: int, seq: int, sdpa: bool, low_memory: bool
) -> None:
    """Engine Gramian and JDOptimizer .grad exact, without a route warning, at sequences that
    are a multiple of the batch (``s = 2b``, ``4b``), equal to it, or neither."""
    torch.manual_seed(0)
    model = _FairseqEncoderDecoder(sdpa).double().train()
    x = torch.randn(batch, seq, 5, dtype=torch.float64)
    losses = layout_losses(model, x, layout)
    check_on_fast_path(model, losses, LAYOUT_BATCH_DIM[layout], low_memory=low_memory)


class _ScatteredGlobalQuery(nn.Module):
    """Longformer's global attention, as transformers writes it: each sample's global tokens
    (the first, and the last too for the samples of ``two_globals``) are gathered from the
    sequence-first states, ``x[seq_idx, batch_idx]``, and scattered into ``[g, b, d]`` zeros at
    ``[local_idx, batch_idx]`` (advanced indexing with two index tensors both ways); the global
    query projection runs there. With ``d = b`` the projection's ``[g, b, d]`` input holds ``b``
    entries along two dimensions: only its graph says which are the samples. ``crossed`` puts
    each global token in another sample's place (``batch_idx`` rolled): the samples then mix."""

    def __init__(self, d: int, two_globals: list[bool], crossed: bool = False) -> None:
        super().__init__()
        self.embed, self.key = nn.Linear(5, d), nn.Linear(d, d)
        self.query_global, self.head = nn.Linear(d, d), nn.Linear(d, 2)
        self.two_globals, self.crossed = torch.tensor(two_globals), crossed

    def forward(self, inputs: Tensor) -> Tensor:  # [b, s, 5] → [b, 2]
        x = torch.tanh(self.embed(inputs)).transpose(0, 1)  # [s, b, d]
        s, b = x.shape[:2]
        is_global = torch.zeros(b, s, dtype=torch.bool)
        is_global[:, 0] = True
        is_global[self.two_globals, s - 1] = True
        counts = is_global.sum(1)
        batch_idx, seq_idx = is_global.nonzero(as_tuple=True)
        local = torch.arange(int(counts.max()))[None] < counts[:, None]  # [b, g]
        local_batch_idx, local_idx = local.nonzero(as_tuple=True)
        target_batch = local_batch_idx.roll(1) if self.crossed else local_batch_idx
        globals_ = x.new_zeros(local.shape[1], b, x.shape[2])
        globals_[local_idx, target_batch] = x[seq_idx, batch_idx]
        q = self.query_global(globals_)  # [g, b, d]
        scores = torch.einsum("gbd,sbd->bgs", q, self.key(x)).softmax(-1)
        context = torch.einsum("bgs,sbd->bgd", scores, x)
        return self.head(context.mean(1))


@pytest.mark.parametrize("layout", list(LAYOUT_BATCH_DIM))
@pytest.mark.parametrize("batch", [8, 5], ids=["b=d", "b!=d"])
@pytest.mark.parametrize("varied", [False, True], ids=["one-global", "one-or-two"])
def test_global_tokens_scattered_into_zeros_take_the_per_sample_path(
    layout: str, batch: int, varied: bool
) -> None:
    """Exact, without a route warning, also at ``b = d`` (the trace follows the gather and the
    scatter: before, the sizes were read, and ``b = d`` sent the step to one row per loss)."""
    torch.manual_seed(0)
    two = [varied and i % 2 == 1 for i in range(batch)]
    model = _ScatteredGlobalQuery(8, two).double()
    x = torch.randn(batch, 6, 5, dtype=torch.float64)
    check_on_fast_path(model, layout_losses(model, x, layout), LAYOUT_BATCH_DIM[layout])


@pytest.mark.parametrize("batch", [8, 5], ids=["b=d", "b!=d"])
def test_global_tokens_scattered_to_other_samples_stay_exact(batch: int) -> None:
    """Each global token scattered into another sample's place: the scatter's index is not the
    gathered entries' sample, so the trace does not read the samples there; the step is exact
    (the check, or the sizes, send it to one row per loss), warned."""
    torch.manual_seed(0)
    model = _ScatteredGlobalQuery(8, [False] * batch, crossed=True).double()
    x = torch.randn(batch, 6, 5, dtype=torch.float64)
    with pytest.warns(EngineRouteWarning):
        check_gramian(model, layout_losses(model, x, "per-sample"), 0, rtol=1e-9)


def test_a_scatter_read_by_its_values_is_read_anew_at_every_step() -> None:
    """The scatter's reading rests on its index's values (each entry's own sample), which a
    later forward of the same shapes need not share: the layout is read at every step
    (``StepTemplate.reusable``), and a step that reads otherwise than the checked one is checked
    anew (``ReadingChanged``). Steps 1–2 scatter each global token to its own sample; step 3,
    same shapes, to another sample's place, where the sizes alone would read the samples as
    before: every step's Gramian against the explicit Jacobian. (Without the new check the
    third step is silently wrong.)"""
    torch.manual_seed(0)
    model = _ScatteredGlobalQuery(8, [False] * 5).double()
    x = torch.randn(5, 6, 5, dtype=torch.float64)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineRouteWarning)  # (the crossed step may warn)
        with Engine(model, batch_dim=0) as engine:
            for step in range(3):
                model.crossed = step == 2
                losses = layout_losses(model, x, "per-sample")()
                jacobian = explicit_jacobian(losses, params)
                gramian = engine.compute_gramian(losses)
                expected = jacobian @ jacobian.T
                torch.testing.assert_close(gramian, expected, rtol=1e-9, atol=1e-12)
