"""Per-sample mode on calls whose samples are folded with another dimension (``Call.group``).

A model that runs its layers on ``x.reshape(-1, d)`` of ``[b, s, d]`` activations (transformers'
OPT does, before its MLP), folds video frames into the batch (``[b·f, C, H, W]`` into a
``Conv2d``) or cuts windows (Swin's ``[b·windows, …]``) gives its hooked calls ``b·k`` entries
along the sample dimension, sample ``i`` owning ``k`` consecutive ones. The engine reads such a
call as ``k`` entries per sample, so that the step stays on the per-sample path (one backward
pass, ``b`` rows); its check proves that reading on the structure's first step, and a layout
that is not sample-major (``[s·b, d]`` from sequence-first ``[s, b, d]`` activations) fails it
and takes the exact row-per-loss route with a warning.

Every case is checked against the explicit Jacobian of the same losses (``_oracle``), in the
three loss layouts of ``test_real_models``: per-sample, ``[batch, tasks]`` and task losses.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram.rules import GenericRule
from jdoptim.autogram.rules import generic as generic_module

from ._oracle import explicit_jacobian
from ._same_losses import check_step

B, S, D = 4, 3, 6


class _ScaledMLP(nn.Module):
    """A module without a layer rule (direct parameters, no child with parameters: a parent
    with such children is split, its children hooked on their rules): the generic rule."""

    def __init__(self, dropout: float = 0.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(D) + 0.5)
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.zeros(D))
        self.dropout = dropout

    def forward(self, rows: Tensor) -> Tensor:  # [N, D]
        assert rows.dim() == 2, "written for a flat batch of rows"
        rows = F.dropout(rows, self.dropout, self.training)  # random draws: the masked re-run
        return torch.tanh(F.linear(rows, self.weight, self.bias)) * self.scale


class _FlatTokens(nn.Module):
    """Token rows folded sample-major (``[b, s, d] → [b·s, d]``) through an embedding, a
    Linear, a LayerNorm and a rule-less module; per-sample head on the mean token."""

    def __init__(self, sequence_first: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        self.sequence_first = sequence_first
        self.embed = nn.Embedding(10, D)
        self.up = nn.Linear(D, 2 * D)
        self.down = nn.Linear(2 * D, D)
        self.norm = nn.LayerNorm(D)
        self.mixer = _ScaledMLP(dropout)
        self.head = nn.Linear(D, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        b, s = tokens.shape
        if self.sequence_first:  # [s, b] folded to s·b rows: not sample-major
            flat = self.embed(tokens.T.reshape(-1))
        else:
            flat = self.embed(tokens.reshape(-1))  # [b·s, D]
        flat = flat + self.down(F.gelu(self.up(flat)))
        flat = self.mixer(self.norm(flat))
        h = flat.reshape(s, b, D).transpose(0, 1) if self.sequence_first else flat.view(b, s, D)
        return self.head(h.mean(1))  # [b, 2]


class _Frames(nn.Module):
    """Video frames folded into the batch: ``[b, f, C, H, W] → [b·f, C, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, video: Tensor) -> Tensor:
        b, f = video.shape[:2]
        maps = self.norm(torch.relu(self.conv(video.flatten(0, 1))))  # [b·f, 4, H, W]
        return self.head(maps.mean((2, 3)).view(b, f, 4).mean(1))


def _flat_tokens(
    sequence_first: bool = False, dropout: float = 0.0
) -> tuple[nn.Module, Callable[[], Tensor]]:
    model = _FlatTokens(sequence_first, dropout).double()
    tokens = torch.randint(0, 10, (B, S))
    return model, lambda: _two_losses(model(tokens))


def _frames() -> tuple[nn.Module, Callable[[], Tensor]]:
    model = _Frames().double()
    video = torch.randn(B, 3, 2, 5, 5, dtype=torch.float64)
    return model, lambda: _two_losses(model(video))


def _two_losses(out: Tensor) -> Tensor:
    """``[b, 2]``: two losses per sample."""
    return torch.stack([out[:, 0].pow(2), out.sin().sum(1)], dim=1)


MODELS = {
    "flat_tokens": _flat_tokens,
    # dropout in the rule-less module: its rows by the whole call re-run with its random draws,
    # the output gradient masked to each sample's rows
    "flat_tokens_dropout": lambda: _flat_tokens(dropout=0.3),
    "frames": _frames,
}
#: loss layout → (how to take it from the [b, 2] losses, batch_dim)
LAYOUTS: dict[str, tuple[Callable[[Tensor], Tensor], int | None]] = {
    "per_sample": (lambda losses: losses[:, 0], 0),
    "batch_tasks": (lambda losses: losses, 0),
    "tasks": (lambda losses: losses.mean(0), None),
}


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def _step_gramian(
    model: nn.Module, losses_of: Callable[[], Tensor], batch_dim: int | None
) -> tuple[Tensor, Tensor, int, list[str]]:
    """The engine's step on fresh losses: its Gramian as ``[N, N]`` (row-major order of the
    losses), the explicit one, the step's ``b``, and its rules' class names."""
    params = [p for p in model.parameters() if p.requires_grad]
    with Engine(model, batch_dim=batch_dim) as engine:
        losses = losses_of()
        jacobian = explicit_jacobian(losses, params)
        step = engine.step(losses, params, [], per_sample=batch_dim is not None)
        with torch.no_grad():
            gramian = step.gramian()
        kinds = [type(parts.rule).__name__ for parts in step.rule_parameters]
    return gramian, jacobian @ jacobian.T, step.b, kinds


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(MODELS))
def test_folded_samples_exact_on_the_per_sample_path(name: str, layout: str) -> None:
    """Gramian and ``.grad`` against the explicit Jacobian; with ``batch_dim`` the step keeps
    the ``b`` samples (one backward row per task, not per loss) and no route warning."""
    torch.manual_seed(0)
    model, run = MODELS[name]()
    pick, batch_dim = LAYOUTS[layout]
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        gramian, expected, b, _ = _step_gramian(model, lambda: pick(run()), batch_dim)
        check_step(model, lambda: pick(run()), batch_dim, rtol=1e-9)
    assert _relative_error(gramian, expected) < 1e-9
    assert b == (B if batch_dim is not None else 1)


def test_folded_calls_take_their_layer_rules() -> None:
    """The embedding, Linear, LayerNorm and Conv2d rules take folded calls; the module without
    a rule takes the generic rule (re-run on each sample's rows)."""
    torch.manual_seed(0)
    for build, wanted in (
        (_flat_tokens, {"EmbeddingRule", "LinearRule", "NormAffineRule", "GenericRule"}),
        (_frames, {"ConvRule", "NormAffineRule", "LinearRule"}),
    ):
        model, run = build()
        _, _, b, kinds = _step_gramian(model, lambda run=run: run()[:, 0], 0)
        assert b == B and wanted <= set(kinds), kinds


def test_generic_rule_loop_fallback_on_folded_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generic rule's per-sample loop (taken where ``vmap`` cannot run the module) hands each
    sample its rows, as the vmapped path does."""
    monkeypatch.setattr(generic_module, "vmap_or_loop", lambda fast, loop: loop())
    torch.manual_seed(0)
    model, run = _flat_tokens()
    gramian, expected, b, kinds = _step_gramian(model, lambda: run()[:, 0], 0)
    assert b == B and "GenericRule" in kinds
    assert _relative_error(gramian, expected) < 1e-9


def test_sequence_first_folding_fails_the_check_and_stays_exact() -> None:
    """``[s·b, d]`` rows (sequence-first, sample-minor) are not read as ``k`` rows per sample:
    the engine's check sees it on the first step, warns naming the modules, and the steps are
    exact by one backward row per loss."""
    torch.manual_seed(0)
    model, run = _flat_tokens(sequence_first=True)
    params = [p for p in model.parameters() if p.requires_grad]
    with Engine(model, batch_dim=0) as engine:
        for k in range(2):
            losses = run()[:, 0]
            jacobian = explicit_jacobian(losses, params)
            if k == 0:
                with pytest.warns(EngineRouteWarning, match="sample-major"):
                    step = engine.step(losses, params, [], per_sample=True)
            else:
                step = engine.step(losses, params, [], per_sample=True)
            with torch.no_grad():
                gramian = step.gramian()
            assert step.b == 1  # one backward row per loss
            assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-9


class _WidePositions(nn.Module):
    """A position embedding ``wpe(arange(t))`` with ``t = 2b``: its ``[t, d]`` output has a
    multiple of the batch size rows but is shared by the samples."""

    def __init__(self, t: int) -> None:
        super().__init__()
        self.t = t
        self.tok = nn.Embedding(10, D)
        self.wpe = nn.Embedding(t, D)
        self.head = nn.Linear(D, 1)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens) + self.wpe(torch.arange(self.t))
        return self.head(torch.tanh(h)).squeeze(-1).pow(2).mean(1)  # [b]


def test_shared_output_with_a_multiple_of_the_batch_rows() -> None:
    """A sample-shared ``[2b, d]`` output is not taken for two rows per sample: on the first
    step it is read at the addition that gives it to the samples (re-run by the generic rule),
    then expanded along the batch; per-sample and exact throughout, with no warning (the
    expansion is the engine's own doing)."""
    torch.manual_seed(0)
    model = _WidePositions(t=2 * B).double()
    tokens = torch.randint(0, 10, (B, 2 * B))
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        with Engine(model, batch_dim=0) as engine:
            for k in range(3):
                losses = model(tokens)
                jacobian = explicit_jacobian(losses, params)
                step = engine.step(losses, params, [], per_sample=True)
                with torch.no_grad():
                    gramian = step.gramian()
                assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-9
                assert step.b == B
                generic = [isinstance(p.rule, GenericRule) for p in step.rule_parameters]
                assert any(generic) if k == 0 else not any(generic)


class _BiasedAttention(nn.Module):
    """An attention layer with parameters of its own (re-run by the generic rule) that returns
    its output ``[b, s, d]`` and a position bias ``[b·heads, s, s]`` (WavLM's layer does), the
    bias computed from a table of its own (added to the one given by the previous layer) and
    gated by the input: its two outputs, and the next layer's inputs, fold the samples by
    different factors."""

    def __init__(self, d: int = 4, heads: int = 2, s: int = 5, dropout: float = 0.0) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Parameter(torch.randn(d, 3 * d) / d)
        self.table = nn.Parameter(torch.randn(heads, s, s) / s)
        self.gate = nn.Parameter(torch.randn(d, heads) / d)

    def forward(self, x: Tensor, given: Tensor | None = None) -> tuple[Tensor, Tensor]:
        b, s, d = x.shape
        gate = torch.sigmoid(x.mean(1) @ self.gate).reshape(b * self.heads, 1, 1)
        bias = (self.repeated(b) if given is None else given + self.repeated(b)) * gate
        q, k, v = (x @ self.qkv).split(d, -1)
        per_head = [t.reshape(b, s, self.heads, -1).transpose(1, 2).reshape(b * self.heads, s, -1)
                    for t in (q, k, v)]  # fmt: skip
        scores = per_head[0] @ per_head[1].transpose(1, 2) + bias
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = (weights @ per_head[2]).reshape(b, self.heads, s, -1).transpose(1, 2)
        # (the bias handed on is computed apart: an output computed from another output of a
        # re-run call takes another route, as ``dependent_outputs`` in ``_certify`` says)
        return x + out.reshape(b, s, d), self.repeated(b) * gate

    def repeated(self, b: int) -> Tensor:
        return self.table.unsqueeze(0).repeat(b, 1, 1, 1).flatten(0, 1)  # [b·heads, s, s]


class _TwoBiasedLayers(nn.Module):
    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.first, self.second = (
            _BiasedAttention(dropout=dropout),
            _BiasedAttention(dropout=dropout),
        )
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h, bias = self.first(x)
        h, _ = self.second(h, bias)
        return self.head(h).pow(2).mean(1)  # [b, 2]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
def test_outputs_folding_the_samples_differently_stay_per_sample(mode: str, layout: str) -> None:
    """The generic rule gives each sample its entries of each output and input (``k = 1`` and
    ``k = heads``; in train mode, the whole call masked per sample, with the recorded dropout
    masks): one per-sample backward, exact, no warning (an error in this suite)."""
    torch.manual_seed(0)
    model = _TwoBiasedLayers(dropout=0.2).double().train(mode == "train")
    x = torch.randn(3, 5, 4, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x)
        return out[:, 0] if layout == "per-sample" else out

    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        for _ in range(3):
            out = losses()
            jacobian = explicit_jacobian(out, params)
            step = engine.step(out, params, [], per_sample=True)
            assert step.b == 3
            with torch.no_grad():
                gramian = step.gramian()
            torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-10, atol=1e-12)
    check_step(model, losses, 0, rtol=1e-10)
