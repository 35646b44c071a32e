"""A sweep of tiny models built from ``torch.nn``'s own layers through jdoptim, against the
explicit Jacobian.

The checking is :mod:`benchmarks.model_zoo`'s, imported, not copied: each entry here is a
builder ``b → (model, run)`` whose ``run(model)`` gives two different per-sample losses
``[b, 2]`` (float64, train mode unless the entry is about eval mode), and model_zoo's
``sweep_model`` runs it in the four layouts (per-sample, ``[batch, tasks]``, task losses,
per-sample ``low_memory``), 3 steps each, with an Engine and a ``JDOptimizer(modules=model)``
on one model (then each alone on a flagged row). Every step must give ``J Jᵀ``, UPGrad's
weights of it and ``.grad = Jᵀ w`` for the explicit Jacobian ``J`` of the same losses; the
outcomes (EXACT / F32 / WRONG / CRASH / REFUSED / BUILD / TIMEOUT / SKIPPED), the tolerances
and the per-layout time limits are model_zoo's.

The entries cover ``Linear``/``Bilinear``/``PReLU``/``LazyLinear``, convolutions (groups,
dilation, stride, padding modes, ``padding='same'``, transposed, ``Unfold``/``Fold``),
``Embedding``/``EmbeddingBag`` (every option that changes the backward), the normalisation
layers, ``RNN``/``LSTM``/``GRU`` (time-major, bidirectional, stacked, projections, initial
states, packed sequences), ``MultiheadAttention`` and the ``nn.Transformer`` family,
parametrizations, tied and free parameters, repeated calls, checkpointing,
``torch.func.functional_call``, loss heads, and a few models that test the per-sample
bookkeeping (tensors shared by the samples, a batch-mean, a user's hooks, pruning, an in-place
ReLU, frozen parameters). An input that does not index the samples has no size 3 or 4, nor a
multiple of one, where the library looks for the samples, except in the ``*_coincide``
entries, which are about that (the ``[b·heads, …]`` attention mask and the ``[b·5, …]`` rows of
``adaptive_log_softmax_positions`` are sample-major by design). The ``*time_major*`` entries
(samples along dimension 1) also run three layouts with ``batch_dim=1``
(:data:`SEQUENCE_FIRST_LAYOUTS`).

The one change to the checking: a sparse gradient (``Embedding(sparse=True)``), in a row of
``J`` or in ``.grad``, is made dense before it is compared (``tests.autogram._oracle`` and
model_zoo's ``flat_grads`` cannot reshape it). Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/layer_zoo.py \\
        [--only NAME[@bN],...] [--layout L] [--batches 3,4] [--out PATH.md]

``--list`` prints the names; ``NAME@bN`` runs NAME at batch N only.
"""

from __future__ import annotations

import argparse
import os
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrizations, prune
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.utils.checkpoint import checkpoint

from benchmarks import model_zoo as zoo
from benchmarks.model_zoo import Builder, Built, Row
from tests.autogram._oracle import explicit_jacobian

F64 = torch.float64
VOCAB = 40
SEQ = 5  # sequence length (neither a batch size of the sweep nor a multiple of one)
DEFAULT_BATCHES = "3,4"

#: Added to model_zoo's layouts for the ``*time_major*`` entries, whose tensors index the samples
#: along dimension 1: per-sample losses ``[b]`` and ``[tasks, batch]`` losses with
#: ``batch_dim=1`` (as the Engine documents for sequence-first models), and the former with
#: ``low_memory``. (model_zoo's ``batch_dim=0`` layouts run on them too.)
SEQUENCE_FIRST_LAYOUTS: dict[str, tuple[Callable[[Tensor], Tensor], int | None, bool]] = {
    "per_sample_dim1": (lambda losses: losses[:, 0], 1, False),
    "tasks_batch_dim1": (lambda losses: losses.T, 1, False),
    "per_sample_dim1_lowmem": (lambda losses: losses[:, 0], 1, True),
}


# ------------------------------------------------------------------------------ losses, inputs
def two_losses(z: Tensor, sample_dim: int = 0) -> Tensor:
    """``[b, 2]``: the mean squared distance of the sample's output to 0.5, and its logsumexp."""
    flat = z.movedim(sample_dim, 0).reshape(z.shape[sample_dim], -1)
    return torch.stack([(flat - 0.5).pow(2).mean(1), flat.logsumexp(1)], dim=1)


def randn(*shape: int) -> Tensor:
    """Float64 normal samples."""
    return torch.randn(*shape, dtype=F64)


def ids(*shape: int, low: int = 1, high: int = VOCAB) -> Tensor:
    """Random token ids in ``low..high-1``."""
    return torch.randint(low, high, shape)


def causal_mask(s: int) -> Tensor:
    """``[s, s]`` boolean, True above the diagonal (the positions not attended)."""
    return torch.ones(s, s, dtype=torch.bool).triu(1)


def padding(b: int, s: int) -> Tensor:
    """``[b, s]`` boolean key padding mask: the last two positions of sample 0 padded."""
    mask = torch.zeros(b, s, dtype=torch.bool)
    mask[0, s - 2 :] = True
    return mask


def lengths(b: int) -> Tensor:
    """Different sequence lengths for a packed sequence (at most ``SEQ``, one of them full)."""
    return torch.tensor([SEQ, 2, 4, 1][:b])


# ------------------------------------------------------------------------------ builder kinds
def stack(make: Callable[[], list[nn.Module]], *shape: int) -> Builder:
    """``nn.Sequential`` of the layers on float64 inputs ``[b, *shape]``; losses of its output."""

    def build(b: int) -> Built:
        model, x = nn.Sequential(*make()), randn(b, *shape)
        return model, lambda m: two_losses(m(x))

    return build


def tokens(make: Callable[[], list[nn.Module]], *shape: int) -> Builder:
    """``nn.Sequential`` of the layers on token ids ``[b, *shape]``; losses of its output."""

    def build(b: int) -> Built:
        model, x = nn.Sequential(*make()), ids(b, *shape)
        return model, lambda m: two_losses(m(x))

    return build


def called(make: Callable[[], nn.Module], *shapes: tuple[int, ...], sample_dim: int = 0) -> Builder:
    """A module called on float64 inputs (``b`` put at ``sample_dim`` of each shape); losses of
    its output (its first element if a tuple), the samples along ``sample_dim``."""

    def build(b: int) -> Built:
        model = make()
        xs = [randn(*s[:sample_dim], b, *s[sample_dim:]) for s in shapes]

        def run(m: nn.Module) -> Tensor:
            out = m(*xs)
            return two_losses(out[0] if isinstance(out, tuple) else out, sample_dim)

        return model, run

    return build


def conv(kind: type[nn.Module], spatial: tuple[int, ...], *args: Any, **kwargs: Any) -> Builder:
    """A convolution (``kind(*args, **kwargs)``, 5 input channels unless ``args`` say) and a tanh,
    on images ``[b, args[0], *spatial]``."""
    return stack(lambda: [kind(*args, **kwargs), nn.Tanh()], args[0], *spatial)


# ------------------------------------------------------------------------- linear family
class BilinearModel(nn.Module):
    """``Bilinear(tanh(Linear(x₁)), x₂)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 6)
        self.bil = nn.Bilinear(6, 5, 8)

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.bil(self.lin(x1).tanh(), x2)


def lazy_linear(b: int) -> Built:
    """``LazyLinear`` materialised by a dry forward before the model is checked."""
    model = nn.Sequential(nn.LazyLinear(6, dtype=F64), nn.Tanh(), nn.Linear(6, 5)).double()
    x = randn(b, 7)
    with torch.no_grad():
        model(x)
    return model, lambda m: two_losses(m(x))


class Wrapped(nn.Module):
    """A Linear inside ``Identity`` wrappers, two levels deep."""

    def __init__(self) -> None:
        super().__init__()
        self.outer = nn.Sequential(nn.Identity(), nn.Sequential(nn.Linear(7, 6), nn.Identity()))
        self.head = nn.Linear(6, 5)
        self.skip = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.skip(self.outer(x).tanh()))


class UnfoldFold(nn.Module):
    """``Unfold`` → a Linear on each patch → ``Fold`` back to an image."""

    def __init__(self) -> None:
        super().__init__()
        self.unfold = nn.Unfold(kernel_size=(2, 3), stride=(1, 2))
        self.lin = nn.Linear(5 * 2 * 3, 2 * 2 * 3)
        self.fold = nn.Fold(output_size=(6, 7), kernel_size=(2, 3), stride=(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        patches = self.unfold(x).transpose(1, 2)  # [b, L, 5·2·3]
        return self.fold(self.lin(patches).tanh().transpose(1, 2))


# -------------------------------------------------------------------------------- embeddings
def embedding(**kwargs: Any) -> Builder:
    """An Embedding (``kwargs``) and a Linear on ids ``[b, 7]`` in ``0..9`` (repeats, some 0)."""

    def build(b: int) -> Built:
        model = nn.Sequential(nn.Embedding(10, 6, **kwargs), nn.Tanh(), nn.Linear(6, 5))
        x = ids(b, 7, low=0, high=10)
        x[0, :2] = 0
        return model, lambda m: two_losses(m(x))

    return build


class BagModel(nn.Module):
    """An EmbeddingBag, a Linear; per-sample weights from a second table if ``learned``."""

    def __init__(self, mode: str, learned: bool = False) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, 6, mode=mode)
        self.scale = nn.Embedding(VOCAB, 1) if learned else None
        self.head = nn.Linear(6, 5)

    def forward(self, x: Tensor, offsets: Tensor | None, weights: Tensor | None) -> Tensor:
        if self.scale is not None:
            weights = self.scale(x).squeeze(-1).sigmoid()
        return self.head(self.bag(x, offsets, per_sample_weights=weights).tanh())


def bag_2d(mode: str) -> Builder:
    """EmbeddingBag on a 2-D input ``[b, 5]`` (each row a bag)."""

    def build(b: int) -> Built:
        model, x = BagModel(mode), ids(b, 5)
        return model, lambda m: two_losses(m(x, None, None))

    return build


def bag_offsets(
    mode: str, weighted: bool = False, learned: bool = False, coincide: bool = False
) -> Builder:
    """EmbeddingBag on a 1-D input with offsets, bag ``i`` being sample ``i`` (bags of 2, 3, 2,
    4 tokens: 7 or 11 in all; with ``coincide``, of 2 tokens each: ``2·b`` in all); fixed
    per-sample weights if ``weighted``, learned if ``learned``."""

    def build(b: int) -> Built:
        sizes = torch.tensor([2, 2, 2, 2] if coincide else [2, 3, 2, 4])[:b]
        model, x = BagModel(mode, learned), ids(int(sizes.sum()))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        weights = randn(x.numel()) if weighted else None
        return model, lambda m: two_losses(m(x, offsets, weights))

    return build


class TiedHead(nn.Module):
    """An Embedding whose table is also the output projection (a tied LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.mix(self.emb(x)).tanh())


def tied_lm(b: int) -> Built:
    """Next-token CE and a logsumexp from a tied Embedding/head on ids ``[b, 7]``."""
    model, x = TiedHead(), ids(b, 7)

    def run(m: nn.Module) -> Tensor:
        logits = m(x)
        ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none")
        return torch.stack([ce.mean(1), logits[:, -1].logsumexp(-1)], dim=1)

    return model, run


# ------------------------------------------------------------------------------ normalisation
class EvalBatchNorm(nn.Module):
    """A conv and a BatchNorm kept in eval mode (random running statistics) by ``train``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(5, 6, 2)
        self.bn = nn.BatchNorm1d(6)
        assert self.bn.running_mean is not None and self.bn.running_var is not None
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.5, 2)

    def train(self, mode: bool = True) -> EvalBatchNorm:
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.conv(x)).tanh()


def norm_after_linear(norm: Callable[[], nn.Module]) -> Builder:
    """A Linear to 6 features, the norm, a Linear, on ``[b, 5, 7]``."""
    return stack(lambda: [nn.Linear(7, 6), norm(), nn.Linear(6, 5)], 5, 7)


def norm_after_conv(norm: Callable[[], nn.Module], spatial: tuple[int, ...]) -> Builder:
    """A conv to 6 channels, the norm, a tanh, on ``[b, 5, *spatial]``."""
    kind = nn.Conv1d if len(spatial) == 1 else nn.Conv2d
    return stack(lambda: [kind(5, 6, 2), norm(), nn.Tanh()], 5, *spatial)


# ---------------------------------------------------------------------------------- recurrent
class Recurrent(nn.Module):
    """A recurrent layer and a Linear on its output; an initial state from a Linear of a
    per-sample vector if ``learned_h0``."""

    def __init__(
        self, kind: Callable[..., nn.RNNBase], learned_h0: bool = False, **kw: Any
    ) -> None:
        super().__init__()
        self.rnn = kind(5, 7, **kw)
        self.batch_first = bool(kw.get("batch_first", False))
        dirs = 2 if kw.get("bidirectional") else 1
        self.states = dirs * int(kw.get("num_layers", 1))
        self.h0 = nn.Linear(5, self.states * 7) if learned_h0 else None
        width = dirs * (kw.get("proj_size") or 7)
        self.head = nn.Linear(width, 5)

    def initial(self, z: Tensor) -> Any:
        assert self.h0 is not None
        h = self.h0(z).view(z.shape[0], self.states, 7).transpose(0, 1).contiguous().tanh()
        return (h, torch.zeros_like(h)) if isinstance(self.rnn, nn.LSTM) else h

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        out, _ = self.rnn(x) if z is None else self.rnn(x, self.initial(z))
        return self.head(out)


def recurrent(
    kind: Callable[..., nn.RNNBase], seq: int = SEQ, learned_h0: bool = False, **kw: Any
) -> Builder:
    """The layer on ``[b, seq, 5]`` (``[seq, b, 5]`` unless ``batch_first``)."""

    def build(b: int) -> Built:
        model = Recurrent(kind, learned_h0, **kw)
        first = bool(kw.get("batch_first", False))
        x, z = randn(*((b, seq) if first else (seq, b)), 5), randn(b, 5)
        dim = 0 if first else 1
        return model, lambda m: two_losses(m(x, z if learned_h0 else None), dim)

    return build


def fixed_h0(b: int) -> Built:
    """A time-major LSTM given a constant ``(h₀, c₀)`` (no parameter in it)."""
    model = Recurrent(nn.LSTM, num_layers=2)
    x, h0, c0 = randn(SEQ, b, 5), randn(2, b, 7), randn(2, b, 7)

    def run(m: nn.Module) -> Tensor:
        assert isinstance(m, Recurrent)
        out, _ = m.rnn(x, (h0, c0))
        return two_losses(m.head(out), 1)

    return model, run


def packed(kind: Callable[..., nn.RNNBase], batch_first: bool, **kw: Any) -> Builder:
    """The layer on a ``pack_padded_sequence`` of different lengths (unsorted), unpacked;
    losses over each sample's valid positions."""

    def build(b: int) -> Built:
        model = Recurrent(kind, batch_first=batch_first, **kw)
        x, n = randn(b, SEQ, 5), lengths(b)
        valid = (torch.arange(SEQ)[None, :] < n[:, None]).to(F64)[..., None]

        def run(m: nn.Module) -> Tensor:
            assert isinstance(m, Recurrent)
            inputs = x if batch_first else x.transpose(0, 1)
            seq = pack_padded_sequence(inputs, n, batch_first, enforce_sorted=False)
            out, _ = pad_packed_sequence(m.rnn(seq)[0], batch_first=True, total_length=SEQ)
            y = m.head(out) * valid
            per = y.sum(1) / n[:, None]
            return torch.stack([(per - 0.5).pow(2).mean(1), per.logsumexp(1)], dim=1)

        return model, run

    return build


# ---------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """Linear projections of the inputs to a MultiheadAttention (``kw``), a Linear after it;
    with ``weights_in_loss`` (batch-first only), the squared attention weights add to it."""

    def __init__(
        self, kdim: int = 8, vdim: int = 8, weights_in_loss: bool = False, **kw: Any
    ) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(5, 8), nn.Linear(5, kdim), nn.Linear(5, vdim)
        self.mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=vdim, **kw)
        self.head = nn.Linear(8, 5)
        self.weights_in_loss = weights_in_loss

    def forward(self, x: Tensor, y: Tensor, **call: Any) -> Tensor:
        out, weights = self.mha(self.q(x), self.k(y), self.v(y), **call)
        out = self.head(out)
        if self.weights_in_loss:  # weights [b, L, S], or [b, heads, L, S] not averaged
            squares = weights.pow(2).sum(-1)
            out = out + (squares.sum(1) if squares.dim() == 3 else squares)[..., None]
        return out


def attention(
    seq: int = SEQ, call: Callable[[int], dict[str, Any]] | None = None, **kw: Any
) -> Builder:
    """Attention of ``seq`` queries over 7 keys; ``call(b)`` gives the call's extra arguments
    (masks, ``need_weights``)."""

    def build(b: int) -> Built:
        model = Attention(**kw)
        first = bool(kw.get("batch_first", False))
        x = randn(*((b, seq) if first else (seq, b)), 5)
        y = randn(*((b, 7) if first else (7, b)), 5)
        extra = call(b) if call else {}
        return model, lambda m: two_losses(m(x, y, **extra), 0 if first else 1)

    return build


def per_sample_mask(b: int) -> dict[str, Any]:
    """A float attention mask ``[b·heads, SEQ, 7]``: each sample and head its own."""
    return {"attn_mask": randn(b * 2, SEQ, 7)}


def _layer(**kw: Any) -> dict[str, Any]:
    return dict(d_model=8, nhead=2, dim_feedforward=16, dropout=0.1, **kw)


class Encoder(nn.Module):
    """A Linear, a 2-layer TransformerEncoder with a final LayerNorm, a Linear."""

    def __init__(self, norm_first: bool, batch_first: bool) -> None:
        super().__init__()
        self.proj, self.head = nn.Linear(5, 8), nn.Linear(8, 5)
        layer = nn.TransformerEncoderLayer(**_layer(norm_first=norm_first, batch_first=batch_first))
        self.encoder = nn.TransformerEncoder(
            layer, 2, norm=nn.LayerNorm(8), enable_nested_tensor=False
        )

    def forward(self, x: Tensor, mask: Tensor, pad: Tensor) -> Tensor:
        return self.head(self.encoder(self.proj(x), mask=mask, src_key_padding_mask=pad))


def encoder(norm_first: bool, batch_first: bool = True) -> Builder:
    """The :class:`Encoder` with a causal mask and key padding on ``[b, SEQ, 5]`` (time-major
    unless ``batch_first``)."""

    def build(b: int) -> Built:
        model = Encoder(norm_first, batch_first)
        x = randn(*((b, SEQ) if batch_first else (SEQ, b)), 5)
        mask, pad, dim = causal_mask(SEQ), padding(b, SEQ), 0 if batch_first else 1
        return model, lambda m: two_losses(m(x, mask, pad), dim)

    return build


class Decoder(nn.Module):
    """Linear projections of target and memory, a TransformerDecoderLayer (or a whole
    ``nn.Transformer`` if ``full``), a Linear."""

    def __init__(self, full: bool) -> None:
        super().__init__()
        self.tgt, self.src, self.head = nn.Linear(5, 8), nn.Linear(7, 8), nn.Linear(8, 5)
        self.body: nn.Module = (
            nn.Transformer(**_layer(num_encoder_layers=1, num_decoder_layers=1, batch_first=True))
            if full
            else nn.TransformerDecoderLayer(**_layer(batch_first=True))
        )

    def forward(self, x: Tensor, y: Tensor, mask: Tensor, pad: Tensor) -> Tensor:
        if isinstance(self.body, nn.Transformer):
            out = self.body(
                self.src(y), self.tgt(x), tgt_mask=mask, src_key_padding_mask=pad,
                memory_key_padding_mask=pad,
            )  # fmt: skip
        else:
            out = self.body(self.tgt(x), self.src(y), tgt_mask=mask, memory_key_padding_mask=pad)
        return self.head(out)


def decoder(full: bool) -> Builder:
    """The :class:`Decoder` on targets ``[b, SEQ, 5]`` (causal) and sources ``[b, 7, 7]``
    (key padding)."""

    def build(b: int) -> Built:
        model, x, y = Decoder(full), randn(b, SEQ, 5), randn(b, 7, 7)
        mask, pad = causal_mask(SEQ), padding(b, 7)
        return model, lambda m: two_losses(m(x, y, mask, pad))

    return build


# --------------------------------------------------------------------------- parametrizations
def quiet(make: Callable[[], nn.Module]) -> nn.Module:
    """``make()`` with its deprecation warnings silenced (the old weight_norm API)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return make()


class Symmetric(nn.Module):
    """A custom parametrization: the symmetric part of a square weight."""

    def forward(self, w: Tensor) -> Tensor:
        return w.triu() + w.triu(1).transpose(0, 1)


def symmetric_linear() -> nn.Module:
    """A 6×6 Linear whose weight is parametrized as symmetric."""
    lin = nn.Linear(6, 6)
    nn.utils.parametrize.register_parametrization(lin, "weight", Symmetric())
    return lin


def parametrized(make: Callable[[], nn.Module]) -> Builder:
    """A Linear to 6, the parametrized layer (6 → 6), a tanh and a Linear, on ``[b, 7]``."""
    return stack(lambda: [nn.Linear(7, 6), make(), nn.Tanh(), nn.Linear(6, 5)], 7)


# ------------------------------------------------------------------- parameters used oddly
class FreeParameter(nn.Module):
    """A scale and an offset (``nn.Parameter``) applied in ``forward``, outside any submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(7, 6), nn.Linear(6, 5)
        self.scale = nn.Parameter(torch.randn(6))
        self.offset = nn.Parameter(torch.randn(5, 6))

    def forward(self, x: Tensor) -> Tensor:
        return self.head((self.lin(x) * self.scale + self.offset).tanh())


class Tied(nn.Module):
    """Two Linears sharing one weight (``transposed``: the second applies its transpose with
    ``F.linear``, an autoencoder's tie), or one Linear called twice (``twice``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.enc, self.dec_bias = nn.Linear(7, 6), nn.Parameter(torch.zeros(7))

    def forward(self, x: Tensor) -> Tensor:
        h = self.enc(x).tanh()
        if self.mode == "transposed":
            return F.linear(h, self.enc.weight.t(), self.dec_bias)
        second = self.a if self.mode == "twice" else self.b
        return second(self.a(h).tanh())


class Checkpointed(nn.Module):
    """A block run under ``torch.utils.checkpoint`` (``use_reentrant=False``) between Linears."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(7, 6), nn.Linear(6, 5)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 6))

    def forward(self, x: Tensor) -> Tensor:
        h = checkpoint(self.block, self.lin(x), use_reentrant=False)
        assert isinstance(h, Tensor)
        return self.head(h)


class FunctionalCall(nn.Module):
    """A submodule run by ``torch.func.functional_call``: with its own parameters, or with its
    weight swapped for a parameter of the parent (``swap``)."""

    def __init__(self, swap: bool) -> None:
        super().__init__()
        self.lin, self.sub, self.head = nn.Linear(7, 6), nn.Linear(6, 6), nn.Linear(6, 5)
        self.alt = nn.Parameter(torch.randn(6, 6) / 3) if swap else None

    def forward(self, x: Tensor) -> Tensor:
        params: dict[str, Tensor] = dict(self.sub.named_parameters())
        if self.alt is not None:
            params["weight"] = self.alt
        h = torch.func.functional_call(self.sub, params, (self.lin(x).tanh(),))
        return self.head(h.tanh())


class Prototypes(nn.Module):
    """Logits against ``n`` prototypes, a Linear of fixed anchors ``[n, 5]`` shared by the
    samples (``n`` equal to the batch size in the ``*_coincide`` entry)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.enc, self.proto = nn.Linear(7, 6), nn.Linear(5, 6)
        self.register_buffer("anchors", torch.randn(n, 5))

    def forward(self, x: Tensor) -> Tensor:
        anchors = self.get_buffer("anchors")
        return self.enc(x).tanh() @ self.proto(anchors).T


class Positions(nn.Module):
    """Token plus position embeddings (``pos(arange(s))``, shared by the samples), a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.pos, self.head = nn.Embedding(VOCAB, 6), nn.Embedding(9, 6), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.tok(x) + self.pos(torch.arange(x.shape[1])))


class Centre(nn.Module):
    """``h - h.mean(0)``: mixes the samples after a hooked module."""

    def forward(self, h: Tensor) -> Tensor:
        return h - h.mean(0)


def _scale_output(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
    return out * 2 + 0.1


def _scale_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Tensor]:
    return (args[0] * 3 - 0.2,)


def user_hooked(kind: str) -> Callable[[], list[nn.Module]]:
    """A Linear with a user's hook that changes its output (``forward``) or input (``pre``),
    registered before jdoptim's, or pruned by ``nn.utils.prune`` (``prune``: its weight is
    ``weight_orig * weight_mask``, set by a forward pre-hook)."""

    def make() -> list[nn.Module]:
        lin = nn.Linear(7, 6)
        if kind == "forward":
            lin.register_forward_hook(_scale_output)
        elif kind == "pre":
            lin.register_forward_pre_hook(_scale_input)
        else:
            prune.l1_unstructured(lin, "weight", amount=0.3)
        return [lin, nn.Tanh(), nn.Linear(6, 5)]

    return make


def frozen(make: Callable[[], list[nn.Module]], *names: str) -> Callable[[], list[nn.Module]]:
    """The layers with the named parameters (of the ``nn.Sequential``) frozen."""

    def frozen_make() -> list[nn.Module]:
        layers = make()
        seq = nn.Sequential(*layers)
        for name in names:
            seq.get_parameter(name).requires_grad_(False)
        return layers

    return frozen_make


# ------------------------------------------------------------------------------------- heads
class AdaptiveHead(nn.Module):
    """A Linear and an AdaptiveLogSoftmaxWithLoss (20 classes, clusters at 6 and 12)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(7, 6)
        self.asm = nn.AdaptiveLogSoftmaxWithLoss(6, 20, cutoffs=[6, 12], div_value=2.0)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.lin(x).tanh()
        return -self.asm(h, y).output, -self.asm.log_prob(h)[..., 0]


def adaptive(positions: int) -> Builder:
    """The head on ``[b, 7]`` (``positions`` 0) or on ``[b·positions, 7]`` rows; the NLL of
    each sample's targets (spread over the three clusters), and the NLL of class 0."""

    def build(b: int) -> Built:
        rows = b * max(positions, 1)
        model, x = AdaptiveHead(), randn(rows, 7)
        y = torch.tensor([1, 8, 15, 19, 3, 13, 7])[torch.arange(rows) % 7]

        def run(m: nn.Module) -> Tensor:
            nll, nll0 = m(x, y)
            return torch.stack([nll.view(b, -1).mean(1), nll0.view(b, -1).mean(1)], dim=1)

        return model, run

    return build


class LossModule(nn.Module):
    """A Linear and a loss module with ``reduction='none'`` as the first loss, a logsumexp as
    the second: CE with label smoothing and class weights, BCE with ``pos_weight``, or NLL over
    a sequence (``[b, classes, SEQ]``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(7, 5)
        self.loss: nn.Module = {
            "ce": lambda: nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, label_smoothing=0.1,
                                              reduction="none"),
            "bce": lambda: nn.BCEWithLogitsLoss(pos_weight=torch.rand(5) + 0.5, reduction="none"),
            "nll": lambda: nn.NLLLoss(reduction="none"),
        }[kind]()  # fmt: skip

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self.lin(x)
        if self.kind == "nll":
            logits = logits.log_softmax(-1).transpose(1, 2)
        first = self.loss(logits, y)
        first = first.reshape(first.shape[0], -1).mean(1)
        return torch.stack([first, logits.reshape(x.shape[0], -1).logsumexp(1)], dim=1)


def loss_module(kind: str) -> Builder:
    """The :class:`LossModule` on ``[b, 7]`` (``[b, SEQ, 7]`` for NLL)."""

    def build(b: int) -> Built:
        model = LossModule(kind)
        x = randn(b, SEQ, 7) if kind == "nll" else randn(b, 7)
        y = {
            "ce": lambda: torch.randint(0, 5, (b,)),
            "bce": lambda: torch.rand(b, 5, dtype=F64),
            "nll": lambda: torch.randint(0, 5, (b, SEQ)),
        }[kind]()
        return model, lambda m: m(x, y)

    return build


# ------------------------------------------------------------------------------------ the zoo
def _lin(*extra: nn.Module, bias: bool = True) -> Callable[[], list[nn.Module]]:
    return lambda: [nn.Linear(7, 6, bias=bias), *extra, nn.Tanh(), nn.Linear(6, 5, bias=bias)]


C1, C2, C3 = (11,), (9, 7), (5, 7, 6)  # spatial sizes of 1-D, 2-D and 3-D inputs

LAYERS: dict[str, Builder] = {
    # ----------------------------------------------------------------------- linear family
    "linear": stack(_lin(), 7),
    "linear_no_bias": stack(_lin(bias=False), 7),
    "linear_3d_input": stack(_lin(), 5, 7),
    "bilinear": called(BilinearModel, (7,), (5,)),
    "identity_wrappers": called(Wrapped, (7,)),
    "prelu_one": stack(lambda: [nn.Linear(7, 6), nn.PReLU(), nn.Linear(6, 5)], 7),
    "prelu_per_channel": stack(lambda: [nn.Conv1d(5, 6, 2), nn.PReLU(6), nn.Flatten(),
                                        nn.Linear(60, 5)], 5, 11),
    "lazy_linear": lazy_linear,
    # ------------------------------------------------------------------------ convolutions
    "conv1d": conv(nn.Conv1d, C1, 5, 6, 2),
    "conv1d_groups": conv(nn.Conv1d, C1, 10, 10, 2, groups=2),
    "conv1d_depthwise": conv(nn.Conv1d, C1, 5, 10, 2, groups=5),
    "conv1d_stride_dilation": conv(nn.Conv1d, C1, 5, 6, 3, stride=2, dilation=2, padding=2),
    "conv1d_reflect": conv(nn.Conv1d, C1, 5, 6, 2, padding=2, padding_mode="reflect"),
    "conv1d_replicate": conv(nn.Conv1d, C1, 5, 6, 2, padding=2, padding_mode="replicate"),
    "conv1d_circular": conv(nn.Conv1d, C1, 5, 6, 2, padding=2, padding_mode="circular"),
    "conv1d_same_even_kernel": conv(nn.Conv1d, C1, 5, 6, 4, padding="same"),
    "conv2d": conv(nn.Conv2d, C2, 5, 6, 2, padding=1),
    "conv2d_groups_stride": conv(nn.Conv2d, C2, 10, 6, 2, groups=2, stride=2),
    "conv2d_depthwise": conv(nn.Conv2d, C2, 5, 5, 2, groups=5),
    "conv2d_dilation": conv(nn.Conv2d, C2, 5, 6, (2, 3), dilation=(2, 1), padding=(1, 2)),
    "conv2d_reflect": conv(nn.Conv2d, C2, 5, 6, 2, padding=1, padding_mode="reflect"),
    "conv2d_replicate": conv(nn.Conv2d, C2, 5, 6, 2, padding=(1, 2), padding_mode="replicate"),
    "conv2d_circular": conv(nn.Conv2d, C2, 5, 6, 2, padding=1, padding_mode="circular"),
    "conv2d_same": conv(nn.Conv2d, C2, 5, 6, (2, 5), padding="same", dilation=2),
    "conv2d_same_reflect_groups": conv(
        nn.Conv2d, C2, 10, 6, 3, padding="same", padding_mode="reflect", groups=2
    ),
    "conv3d": conv(nn.Conv3d, C3, 5, 6, (2, 3, 2), stride=(1, 2, 1)),
    "conv3d_groups_circular": conv(
        nn.Conv3d, C3, 10, 6, 2, groups=2, padding=1, padding_mode="circular"
    ),
    "conv_transpose1d": conv(nn.ConvTranspose1d, C1, 5, 6, 3, stride=2, output_padding=1),
    "conv_transpose2d_groups": conv(
        nn.ConvTranspose2d, C2, 10, 6, 3, stride=2, groups=2, output_padding=1, padding=1
    ),
    "conv_transpose2d_dilation": conv(nn.ConvTranspose2d, C2, 5, 6, 2, dilation=2, bias=False),
    "conv_transpose3d": conv(nn.ConvTranspose3d, C3, 5, 6, 2, stride=(2, 1, 2)),
    "unfold_linear_fold": called(UnfoldFold, (5, 6, 7)),
    "conv_pool_dropout2d": stack(lambda: [nn.Conv2d(5, 6, 2), nn.Dropout2d(0.3), nn.MaxPool2d(2),
                                          nn.AdaptiveAvgPool2d((2, 1)), nn.Flatten(),
                                          nn.Linear(12, 5)], 5, *C2),
    # -------------------------------------------------------------------------- embeddings
    "embedding": embedding(),
    "embedding_padding_idx": embedding(padding_idx=0),
    "embedding_max_norm": embedding(max_norm=1.0),
    "embedding_scale_grad_by_freq": embedding(scale_grad_by_freq=True),
    "embedding_sparse": embedding(sparse=True),
    "embedding_bag_sum_2d": bag_2d("sum"),
    "embedding_bag_mean_2d": bag_2d("mean"),
    "embedding_bag_max_2d": bag_2d("max"),
    "embedding_bag_sum_offsets": bag_offsets("sum"),
    "embedding_bag_mean_offsets": bag_offsets("mean"),
    "embedding_bag_max_offsets": bag_offsets("max"),
    "embedding_bag_per_sample_weights": bag_offsets("sum", weighted=True),
    "embedding_bag_learned_weights": bag_offsets("sum", learned=True),
    "embedding_bag_learned_weights_coincide": bag_offsets("sum", learned=True, coincide=True),
    "tied_embedding_head": tied_lm,
    # ----------------------------------------------------------------------- normalisation
    "layer_norm": norm_after_linear(lambda: nn.LayerNorm(6)),
    "layer_norm_no_affine": norm_after_linear(lambda: nn.LayerNorm(6, elementwise_affine=False)),
    "layer_norm_no_bias": norm_after_linear(lambda: nn.LayerNorm(6, bias=False)),
    "layer_norm_2d_shape": stack(lambda: [nn.Linear(7, 6), nn.LayerNorm((5, 6))], 5, 7),
    "rms_norm": norm_after_linear(lambda: nn.RMSNorm(6)),
    "rms_norm_2d_shape": stack(lambda: [nn.Linear(7, 6), nn.RMSNorm((5, 6), eps=1e-6)], 5, 7),
    "group_norm": norm_after_conv(lambda: nn.GroupNorm(2, 6), C1),
    "instance_norm1d_affine": norm_after_conv(lambda: nn.InstanceNorm1d(6, affine=True), C1),
    "instance_norm2d_affine_tracked": norm_after_conv(
        lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True), C2
    ),
    "instance_norm1d_tracked": norm_after_conv(
        lambda: nn.InstanceNorm1d(6, track_running_stats=True), C1
    ),
    "batch_norm_eval": called(EvalBatchNorm, (5, 11)),
    "batch_norm_train": norm_after_conv(lambda: nn.BatchNorm2d(6), C2),
    "local_response_norm": stack(lambda: [nn.Conv2d(5, 6, 2), nn.LocalResponseNorm(3),
                                          nn.Conv2d(6, 5, 2), nn.Tanh()], 5, *C2),
    # --------------------------------------------------------------------------- recurrent
    "rnn_batch_first": recurrent(nn.RNN, batch_first=True),
    "rnn_time_major": recurrent(nn.RNN, nonlinearity="relu"),
    "lstm_batch_first": recurrent(nn.LSTM, batch_first=True),
    "lstm_time_major_bidirectional": recurrent(nn.LSTM, bidirectional=True),
    "lstm_2_layers_dropout": recurrent(nn.LSTM, batch_first=True, num_layers=2, dropout=0.3),
    "lstm_proj_size": recurrent(nn.LSTM, batch_first=True, proj_size=5),
    "lstm_proj_bidirectional_2_layers_time_major": recurrent(
        nn.LSTM, num_layers=2, bidirectional=True, proj_size=5
    ),
    "gru_batch_first_bidirectional": recurrent(nn.GRU, batch_first=True, bidirectional=True),
    "gru_time_major_2_layers": recurrent(nn.GRU, num_layers=2, dropout=0.3),
    "gru_learned_h0": recurrent(nn.GRU, learned_h0=True, batch_first=True, num_layers=2),
    "lstm_learned_h0_time_major": recurrent(nn.LSTM, learned_h0=True, bidirectional=True),
    "lstm_fixed_h0_time_major": fixed_h0,
    "lstm_packed_batch_first": packed(nn.LSTM, True),
    "gru_packed_time_major_bidirectional": packed(nn.GRU, False, bidirectional=True),
    "rnn_packed_2_layers": packed(nn.RNN, True, num_layers=2, dropout=0.3),
    "rnn_time_major_coincide": lambda b: recurrent(nn.RNN, seq=b)(b),
    "gru_batch_first_coincide": lambda b: recurrent(nn.GRU, seq=b, batch_first=True)(b),
    # ---------------------------------------------------------------------------- attention
    "mha_batch_first": attention(batch_first=True),
    "mha_time_major": attention(),
    "mha_kdim_vdim": attention(kdim=6, vdim=7, batch_first=True),
    "mha_kdim_vdim_time_major": attention(kdim=6, vdim=7),
    "mha_add_bias_kv": attention(add_bias_kv=True, batch_first=True),
    "mha_add_zero_attn": attention(add_zero_attn=True, batch_first=True),
    "mha_key_padding_mask": attention(
        call=lambda b: {"key_padding_mask": padding(b, 7)}, batch_first=True
    ),
    "mha_attn_mask": attention(
        call=lambda b: {"attn_mask": causal_mask(7)[:SEQ]}, batch_first=True
    ),
    "mha_per_sample_attn_mask": attention(call=per_sample_mask, batch_first=True),
    "mha_need_weights_false": attention(call=lambda b: {"need_weights": False}, batch_first=True),
    "mha_weights_in_loss": attention(
        call=lambda b: {"average_attn_weights": False}, weights_in_loss=True, batch_first=True
    ),
    "mha_dropout": attention(dropout=0.2, batch_first=True),
    "mha_dropout_time_major_masks": attention(
        call=lambda b: {"key_padding_mask": padding(b, 7), "need_weights": False}, dropout=0.2
    ),
    "mha_time_major_coincide": lambda b: attention(seq=b)(b),
    "transformer_encoder_post_norm": encoder(norm_first=False),
    "transformer_encoder_pre_norm": encoder(norm_first=True),
    "transformer_encoder_time_major": encoder(norm_first=False, batch_first=False),
    "transformer_decoder_layer": decoder(full=False),
    "transformer_full": decoder(full=True),
    # --------------------------------------------------------------------- parametrizations
    "weight_norm_old_api": parametrized(lambda: quiet(lambda: nn.utils.weight_norm(
        nn.Linear(6, 6)))),
    "weight_norm": parametrized(lambda: parametrizations.weight_norm(nn.Linear(6, 6))),
    "weight_norm_conv": stack(lambda: [parametrizations.weight_norm(nn.Conv1d(5, 6, 2)),
                                       nn.Tanh()], 5, 11),
    "spectral_norm_old_api": parametrized(lambda: nn.utils.spectral_norm(nn.Linear(6, 6))),
    "spectral_norm": parametrized(lambda: parametrizations.spectral_norm(nn.Linear(6, 6))),
    "orthogonal": parametrized(lambda: parametrizations.orthogonal(nn.Linear(6, 6))),
    "orthogonal_cayley": parametrized(
        lambda: parametrizations.orthogonal(nn.Linear(6, 6), orthogonal_map="cayley")
    ),
    "custom_parametrization": parametrized(symmetric_linear),
    # ------------------------------------------------------------ parameters used oddly
    "free_parameter": called(FreeParameter, (5, 7)),
    "tied_linears": called(lambda: Tied("tied"), (7,)),
    "tied_transposed_f_linear": called(lambda: Tied("transposed"), (7,)),
    "module_called_twice": called(lambda: Tied("twice"), (7,)),
    "checkpoint_non_reentrant": called(Checkpointed, (5, 7)),
    "functional_call_own_params": called(lambda: FunctionalCall(swap=False), (7,)),
    "functional_call_swapped_weight": called(lambda: FunctionalCall(swap=True), (7,)),
    # ------------------------------------------------- samples, hooks and in-place changes
    "shared_prototypes": called(lambda: Prototypes(5), (7,)),
    "shared_prototypes_coincide": lambda b: called(lambda: Prototypes(b), (7,))(b),
    "position_embedding": tokens(lambda: [Positions()], SEQ),
    "position_embedding_coincide": lambda b: tokens(lambda: [Positions()], b)(b),
    "batch_mean_centering": stack(_lin(Centre()), 7),
    "user_forward_hook": stack(user_hooked("forward"), 7),
    "user_forward_pre_hook": stack(user_hooked("pre"), 7),
    "prune_l1_unstructured": stack(user_hooked("prune"), 7),
    "relu_inplace": stack(_lin(nn.ReLU(inplace=True)), 5, 7),
    "frozen_bias": stack(frozen(_lin(), "0.bias"), 7),
    "frozen_first_linear": stack(frozen(_lin(), "0.weight", "0.bias"), 7),
    # -------------------------------------------------------------------------------- heads
    "adaptive_log_softmax": adaptive(0),
    "adaptive_log_softmax_positions": adaptive(5),
    "cross_entropy_label_smoothing": loss_module("ce"),
    "bce_reduction_none": loss_module("bce"),
    "nll_sequence_reduction_none": loss_module("nll"),
}  # fmt: skip


# --------------------------------------------------------------------- hooking into model_zoo
def dense_jacobian(losses: Tensor, params: list[Tensor]) -> Tensor:
    """The oracle's explicit Jacobian; where a gradient is sparse (which the oracle cannot
    reshape), the same rows with the sparse gradients made dense."""
    if not any(getattr(p, "_layer_zoo_sparse", False) for p in params):
        return explicit_jacobian(losses, params)
    rows = []
    for loss in losses.reshape(-1):
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        parts = [
            (torch.zeros_like(p) if g is None else g.to_dense()).reshape(-1)
            for g, p in zip(grads, params)
        ]
        rows.append(torch.cat(parts))
    return torch.stack(rows)


_flat_grads = zoo.flat_grads


def dense_grads(params: list[Tensor]) -> Tensor:
    """model_zoo's ``flat_grads``, after making a sparse ``.grad`` dense (it cannot reshape
    one; the step is taken by then, and ``zero_grad`` clears it before the next)."""
    for p in params:
        if p.grad is not None and p.grad.is_sparse:
            p.grad = p.grad.to_dense()
    return _flat_grads(params)


def build(name: str, b: int) -> Built:
    """model_zoo's ``build`` (seeded, float64, train mode) of this file's entries, with the
    weights of sparse embeddings marked for :func:`dense_jacobian`."""
    torch.manual_seed(0)
    model, run = LAYERS[name](b)
    for module in model.modules():
        if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.sparse:
            module.weight._layer_zoo_sparse = True  # type: ignore[attr-defined]
    return model.double().train(), run


def rerun_command(row: Row) -> str:
    """The command that runs this row alone."""
    return (
        "OMP_NUM_THREADS=1 PYTHONPATH=$PWD .venv/bin/python benchmarks/layer_zoo.py "
        f"--only {row.model} --layout {row.layout}"
    )


def install() -> None:
    """Points model_zoo's machinery at this file: its entries (read by ``_plan`` and
    ``_module_paths`` through ``build``), its sequence-first layouts, its sparse-tolerant
    oracle and ``.grad`` reader, and its rerun command."""
    zoo.MODELS = LAYERS
    zoo.LAYOUTS.update(SEQUENCE_FIRST_LAYOUTS)
    zoo.build = build
    zoo.explicit_jacobian = dense_jacobian
    zoo.flat_grads = dense_grads
    zoo.rerun_command = rerun_command


# ------------------------------------------------------------------------------------ report
MODULE_LABEL = re.compile(r"'[^']*' \(\w+\)")


def cause(text: str) -> str:
    """A route warning's text with its module labels, numbers and shapes taken out: the
    warnings of one cause share it."""
    key = MODULE_LABEL.sub("<module>", text)
    key = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", key)
    return re.sub(r"\((N, )*N\)(, \((N, )*N\))*", "<shape>", key)


@dataclass
class Cause:
    """The route warnings of one cause: their modules, an example text, the rows by entry."""

    example: str
    modules: set[str] = field(default_factory=set)
    rows: dict[str, set[str]] = field(default_factory=dict)  # entry → {layout@bN}

    def add(self, row: Row, text: str) -> None:
        self.modules.update(MODULE_LABEL.findall(text))
        name, batch = zoo.parse_label(row.model)
        self.rows.setdefault(name, set()).add(f"{row.layout}@b{batch or zoo.DEFAULT_BATCH}")


def warnings_by_cause(rows: list[Row]) -> dict[str, Cause]:
    """The EngineRouteWarnings of the rows, grouped by :func:`cause`."""
    grouped: dict[str, Cause] = {}
    for row in rows:
        for text in row.route_warnings:
            grouped.setdefault(cause(text), Cause(text)).add(row, text)
    return grouped


def _warning_lines(rows: list[Row]) -> list[str]:
    grouped = warnings_by_cause(rows)
    if not grouped:
        return []
    lines = ["", "## EngineRouteWarnings by cause (module labels, numbers, shapes taken out)", ""]
    for key, found in sorted(grouped.items(), key=lambda item: -len(item[1].rows)):
        lines.append(f"- {zoo._cell(key, 1500)}")
        lines.append(f"  - modules: {', '.join(sorted(found.modules))}")
        entries = [f"{name} ({', '.join(sorted(where))})" for name, where in found.rows.items()]
        lines.append(f"  - entries ({len(entries)}): {'; '.join(entries)}")
        lines.append(f"  - example: {zoo._cell(found.example, 1500)}")
    return lines


def report(rows: list[Row], seconds: float) -> str:
    """The Markdown report: setup, counts, model_zoo's summary, every row, the route warnings
    grouped by cause."""
    lines = [
        "# jdoptim layer zoo",
        "",
        f"`benchmarks/layer_zoo.py` at {zoo.tree_state()}; torch {torch.__version__}; "
        f"{seconds / 60:.1f} min. Tiny float64 models of torch.nn layers, train mode, "
        f"{zoo.STEPS} steps per layout, each checked against the explicit Jacobian (tolerance "
        f"{zoo.TOL:g} relative on Gramians and `.grad`, {zoo.WEIGHTS_TOL:g} absolute on UPGrad "
        "weights). `NAME@bN`: batch N (default 3). See the module docstrings of "
        "`benchmarks/layer_zoo.py` and `benchmarks/model_zoo.py` for the setup and outcomes.",
        "",
        zoo.counts_line(rows),
        "",
        *zoo._summary(rows),
        "",
        "## Every row",
        "",
        "| entry | layout | outcome | s | errors / message |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        text = zoo._cell(zoo.detail(r), 600)
        lines.append(f"| {r.model} | {r.layout} | {r.outcome} | {r.seconds} | {text} |")
    return "\n".join([*lines, *_warning_lines(rows)]) + "\n"


# -------------------------------------------------------------------------------------- main
def sweep(name: str, b: int, layouts: list[str]) -> list[Row]:
    """model_zoo's ``sweep_model``; an error of the harness itself becomes a BUILD row."""
    try:
        return zoo.sweep_model(name, b, layouts)
    except Exception as err:  # the rows catch the library's errors: this is the harness's
        message = f"harness error: {type(err).__name__}: {str(err)[:300]}"
        return [Row(zoo.label(name, b), "-", "BUILD", message=message)]


def layouts_of(name: str) -> list[str]:
    """model_zoo's four layouts, and the sequence-first ones for a ``*time_major*`` entry."""
    extra = list(SEQUENCE_FIRST_LAYOUTS) if "time_major" in name else []
    return [layout for layout in zoo.LAYOUTS if layout not in SEQUENCE_FIRST_LAYOUTS] + extra


def main() -> None:
    """Parses the arguments, sweeps, prints a line per row and the counts, writes ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--only", help="NAME or NAME@bN, comma-separated (default: every entry)")
    names = " | ".join([*zoo.LAYOUTS, *SEQUENCE_FIRST_LAYOUTS])
    parser.add_argument("--layout", help=f"{names} (default: four, seven if time-major)")
    parser.add_argument("--batches", default=DEFAULT_BATCHES, help="comma-separated, e.g. 3,4")
    parser.add_argument("--out", type=Path, help="write the Markdown report there")
    parser.add_argument("--traceback", action="store_true", help="print CRASH tracebacks")
    parser.add_argument("--list", action="store_true", help="print the entry names")
    args = parser.parse_args()
    install()
    if args.list:
        print("\n".join(LAYERS))
        return
    torch.set_num_threads(1)
    batches = [int(x) for x in args.batches.split(",")]
    chosen = zoo._layouts(args.layout) if args.layout else None
    start = time.perf_counter()
    rows: list[Row] = []
    for name, b in zoo._plan(args.only, batches):
        for row in sweep(name, b, chosen or layouts_of(name)):
            rows.append(row)
            zoo.print_row(row, 36, args.traceback)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report(rows, time.perf_counter() - start))
    print(zoo.counts_line(rows))


if __name__ == "__main__":
    main()
