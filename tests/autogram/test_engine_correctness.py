"""The engine on the cases that used to crash or go silently wrong (issue 15), each against the
explicit Jacobian of the same losses (see :mod:`._same_losses`)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from jdoptim.autogram import Engine, EngineRouteWarning

from ._oracle import assert_gramian_close, explicit_jacobian
from ._same_losses import check_gramian, check_step, trainable


class _PermutedEmbedding(nn.Module):
    """An embedding output permuted as T5 does (``.permute(2, 0, 1)``): non-contiguous gradients
    reach the embedding and the Linear that reads the permuted tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).permute(2, 0, 1).tanh())  # [d, b, s] -> [d, b, 2]


class _StackedHeads(nn.Module):
    """Two heads stacked along dimension 1, then transposed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 3)
        self.b = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([self.a(x), self.b(x)], dim=1).transpose(1, 2)  # [b, 3, 2]


def _permuted() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return _PermutedEmbedding(), torch.randint(0, 7, (2, 3))


def _stacked() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    return _StackedHeads(), torch.randn(4, 5)


def test_permuted_embedding_output_task_losses() -> None:
    model, tokens = _permuted()
    check_gramian(model, lambda: model(tokens).pow(2).sum((1, 2)), None)  # 4 task losses
    check_step(model, lambda: model(tokens).pow(2).sum((1, 2)), None)


class _TransposedEmbedding(nn.Module):
    """An embedding output transposed within each sample (``[b, s, d] -> [b, d, s]``), read by
    a Linear over the positions: samples stay on dimension 0, gradients are non-contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.head = nn.Linear(3, 2)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.embed(tokens).permute(0, 2, 1).tanh())  # [b, d, 2]


def test_permuted_embedding_output_per_sample() -> None:
    torch.manual_seed(0)
    model, tokens = _TransposedEmbedding(), torch.randint(0, 7, (5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)  # exact on the per-sample path
        check_gramian(model, lambda: model(tokens).pow(2).sum((1, 2)), 0)
        check_gramian(model, lambda: model(tokens).pow(2).sum(2)[:, :2], 0)
        check_step(model, lambda: model(tokens).pow(2).sum((1, 2)), 0)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_stacked_heads(batch_dim: int | None) -> None:
    model, x = _stacked()

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum((0, 1)) if batch_dim is None else out.sum((1, 2))

    check_gramian(model, losses, batch_dim)
    check_step(model, losses, batch_dim)


def test_stacked_heads_task_matrix() -> None:
    """``[batch, tasks]`` losses from the stacked, transposed heads."""
    model, x = _stacked()
    check_gramian(model, lambda: model(x).pow(2).sum(1), 0)
    check_step(model, lambda: model(x).pow(2).sum(1), 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_losses_of_a_float32_model(dtype: torch.dtype) -> None:
    """Issue 19: per-sample losses cast to half precision (``model(x).to(dtype)``) of a float32
    model. The Gramian's entries are float32 sums; rounded to the losses' dtype they moved the
    update by 4-17%. The Gramian is now returned and weighted in the parameters' precision."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    x = torch.randn(8, 6)

    def losses() -> Tensor:
        return model(x).pow(2).sum(1).to(dtype)

    gramian = check_gramian(model, losses, 0, rtol=1e-5)
    assert gramian.dtype == torch.float32
    check_step(model, losses, 0, rtol=1e-4)


# -- random draws -----------------------------------------------------------------------------


class _FreeDropout(nn.Module):
    """Direct parameters (so the generic rule re-runs it) and F.dropout(p=0.5) in its forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5) * 0.5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.dropout(torch.tanh(x @ self.weight), p=0.5, training=self.training)
        return self.head(h)


#: the random draws of CUDA are restored too; run there when a device is present
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _encoder_layer(device: str = "cpu") -> tuple[nn.Module, Tensor]:
    """``nn.TransformerEncoderLayer`` with its default dropout (0.1), in training mode; its
    ``MultiheadAttention`` has direct parameters and draws attention dropout inside."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    return layer.train().to(device), x.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_dropout_inside_a_re_run_module(batch_dim: int | None, device: str) -> None:
    """The re-run draws the recorded call's dropout mask (38% off before, per-sample)."""
    torch.manual_seed(0)
    model = _FreeDropout().double().train().to(device)
    x = torch.randn(5, 6, dtype=torch.float64, device=device)

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum(1) if batch_dim == 0 else out.mean(0)

    check_gramian(model, losses, batch_dim, rtol=1e-10)
    check_step(model, losses, batch_dim, rtol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_transformer_encoder_layer_with_default_dropout(batch_dim: int | None, device: str) -> None:
    model, x = _encoder_layer(device)

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum((1, 2)) if batch_dim == 0 else out.mean((0, 1))[:4]

    check_gramian(model, losses, batch_dim, rtol=1e-10)
    check_step(model, losses, batch_dim, rtol=1e-8)


def test_transformer_encoder_layer_with_dropout_task_matrix() -> None:
    model, x = _encoder_layer()
    check_gramian(model, lambda: model(x).pow(2).sum(1)[:, :3], 0, rtol=1e-10)


def test_re_run_leaves_the_random_stream_as_it_was() -> None:
    """The re-run restores the recorded generator state inside ``fork_rng``: after the step,
    the user's next random draw is the one it would have been without the engine's re-run."""
    torch.manual_seed(0)
    model = _FreeDropout().train()
    x = torch.randn(5, 6)
    with Engine(model, batch_dim=0) as engine:
        losses = model(x).pow(2).sum(1)
        state = torch.get_rng_state()
        engine.compute_gramian(losses)
        assert torch.equal(torch.get_rng_state(), state)


# -- calls shared by the samples, and losses or forwards that mix them ------------------------


class _TinyGPT(nn.Module):
    """nanoGPT's embedding: ``wte(idx) + wpe(arange(t))``; the position embedding's output
    ``[t, d]`` (or ``[1, t, d]``) is shared by every sample."""

    def __init__(self, t: int, leading_one: bool = False) -> None:
        super().__init__()
        self.wte = nn.Embedding(11, 6)
        self.wpe = nn.Embedding(t, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 11, bias=False)
        self.leading_one = leading_one

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1])
        pos = self.wpe(positions[None] if self.leading_one else positions)
        return self.head(torch.tanh(self.mix(self.wte(idx) + pos)))


@pytest.mark.parametrize(
    "batch,t,leading_one", [(4, 4, False), (3, 5, False), (3, 5, True)], ids=["t=b", "t!=b", "1ts"]
)
def test_position_embedding_shared_by_the_samples(batch: int, t: int, leading_one: bool) -> None:
    """Per-sample and ``[batch, tasks]`` losses of a model with a position embedding: exact,
    also when ``t`` equals the batch size (7-26% off before, silently) and on a second step
    (the route is remembered for the structure)."""
    torch.manual_seed(0)
    model = _TinyGPT(t, leading_one).double()
    idx = torch.randint(0, 11, (batch, t))

    # No EngineRouteWarning (an error in the suite): the engine expands wpe's output along the
    # batch from the second step on (tests/autogram/test_shared_calls.py).
    check_gramian(model, lambda: model(idx).pow(2).sum((1, 2)), 0, rtol=1e-10)
    check_gramian(model, lambda: model(idx).pow(2).sum(1)[:, :3], 0, rtol=1e-10)
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            losses = model(idx).pow(2).sum((1, 2))
            jacobian = explicit_jacobian(losses, trainable(model))
            gramian = engine.compute_gramian(losses)
            assert_gramian_close(gramian, jacobian @ jacobian.T, rtol=1e-10)
    check_step(model, lambda: model(idx).pow(2).sum((1, 2)), 0, rtol=1e-8)


def test_shared_call_with_batch_dim_one() -> None:
    """Samples along dimension 1 and a shared ``[t, d]`` output with ``t = b``."""
    torch.manual_seed(0)
    wpe, lin = nn.Embedding(3, 4).double(), nn.Linear(4, 4).double()
    model = nn.ModuleDict({"wpe": wpe, "lin": lin})
    x = torch.randn(2, 3, 4, dtype=torch.float64)  # [extra, batch, features]

    def losses() -> Tensor:
        return lin(x + wpe(torch.arange(3))).pow(2).sum(-1)  # [2, batch]

    with pytest.warns(EngineRouteWarning, match="'wpe'"):
        check_gramian(model, losses, 1, rtol=1e-10)
    with pytest.warns(EngineRouteWarning):
        check_step(model, losses, 1, rtol=1e-8)


class _Centred(nn.Module):
    """``h - h.mean(0)`` between two layers: the forward mixes the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.second = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.first(x))
        return self.second(h - h.mean(0))


def _mlp() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).double()
    return model, torch.randn(6, 5, dtype=torch.float64)


def _contrastive(model: nn.Module, x: Tensor) -> Tensor:
    z = model(x)
    logits = z @ z.T
    return torch.nn.functional.cross_entropy(logits, torch.arange(x.shape[0]), reduction="none")


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
@pytest.mark.parametrize("case", ["contrastive", "flipped", "centred"])
def test_losses_or_forwards_that_mix_samples(case: str, low_memory: bool) -> None:
    """Per-sample losses that are not each a function of their own sample (a contrastive loss:
    17% off before; a flipped loss vector: 55%; ``h - h.mean(0)`` in the forward): detected by
    the engine's check, warned about, and computed exactly with one backward row per loss."""
    if case == "centred":
        torch.manual_seed(0)
        model, x = _Centred().double(), torch.randn(6, 5, dtype=torch.float64)
    else:
        model, x = _mlp()

    def losses() -> Tensor:
        if case == "contrastive":
            return _contrastive(model, x)
        out = model(x).pow(2).sum(1)
        return out.flip(0) if case == "flipped" else out

    with pytest.warns(EngineRouteWarning, match="not each a function of their own sample"):
        check_gramian(model, losses, 0, rtol=1e-10, low_memory=low_memory)
    with pytest.warns(EngineRouteWarning):
        check_step(model, losses, 0, rtol=1e-8, low_memory=low_memory)


def test_independent_per_sample_losses_keep_the_fast_path() -> None:
    """The check passes on per-sample losses that are independent: no warning, per-sample
    rows (``b`` samples, one row each)."""
    model, x = _mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        with Engine(model, batch_dim=0) as engine:
            for _ in range(2):
                losses = model(x).pow(2).sum(1)
                step = engine.step(losses, trainable(model), [], per_sample=True)
                assert (step.b, step.T, step.batch_dim) == (6, 1, 0)


# -- side effects of a re-run ---------------------------------------------------------------


class _Counting(nn.Module):
    """Direct parameters, a buffer updated in place and an attribute rebound in ``forward``,
    and an output that depends on that attribute (a re-run reading the state its own forward
    changed would compute another function)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4) * 0.5)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0
        # (direct parameters only: a module with children that have parameters is split, its
        # children hooked on their rules, and nothing of it is re-run)
        self.head_weight = nn.Parameter(torch.randn(2, 4) * 0.5)
        self.head_bias = nn.Parameter(torch.zeros(2))

    def forward(self, x: Tensor) -> Tensor:
        self.seen.add_(1.0)
        self.calls += 1
        hidden = torch.tanh(x @ self.weight) * (1.0 + 0.1 * self.calls)
        return F.linear(hidden, self.head_weight, self.head_bias)


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
@pytest.mark.parametrize("batch_dim", [None, 0])
def test_re_run_does_not_repeat_side_effects(batch_dim: int | None, low_memory: bool) -> None:
    """The buffer and the counter move once per user forward, never in the engine's re-runs;
    the re-run that reads the counter is found unfaithful by the check, warned about by path,
    and its module's rows are taken from autograd: exact."""
    torch.manual_seed(0)
    model = _Counting().double()
    x = torch.randn(4, 5, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x).pow(2)
        return out.sum(1) if batch_dim == 0 else out.mean(0)

    with pytest.warns(EngineRouteWarning, match="the model itself \\(_Counting\\)"):
        check_gramian(model, losses, batch_dim, rtol=1e-10, low_memory=low_memory)
    assert model.calls == 1 and model.seen.item() == 1.0
    with pytest.warns(EngineRouteWarning):
        check_step(model, losses, batch_dim, rtol=1e-8, low_memory=low_memory)
    assert model.calls == 2 and model.seen.item() == 2.0


class _HiddenAndLogits(nn.Module):
    """A re-run module returning its hidden state and the logits computed from it: the
    backward's gradient at the hidden state already holds what flows through the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))
        self.head_weight = nn.Parameter(torch.randn(3, 4) * 0.5)  # (direct: see _Counting)
        self.head_bias = nn.Parameter(torch.zeros(3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.tanh(x @ self.weight)
        return hidden, F.linear(hidden, self.head_weight, self.head_bias)


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("share", [1.0, 1e-8])
def test_outputs_computed_from_one_another(
    batch_dim: int | None, share: float, low_memory: bool
) -> None:
    """The generic rule's product over both outputs would count the path through the logits
    twice; with the logits' share of the losses at ``1e-8`` that is a ``1e-9`` error, below the
    check's tolerance. The engine sees the dependence in the graph instead, warns, and takes
    the module's rows from autograd: exact to rounding."""
    torch.manual_seed(0)
    model = _HiddenAndLogits().double()
    x = torch.randn(6, 5, dtype=torch.float64)

    def losses() -> Tensor:
        hidden, logits = model(x)
        per_sample = hidden.pow(2).sum(1) + share * logits.sin().sum(1)
        return (
            per_sample
            if batch_dim == 0
            else torch.stack([per_sample[:3].sum(), per_sample[3:].sum()])
        )

    with pytest.warns(EngineRouteWarning, match="computed from another of them"):
        check_gramian(model, losses, batch_dim, rtol=1e-13, low_memory=low_memory)
    with pytest.warns(EngineRouteWarning):
        check_step(model, losses, batch_dim, rtol=1e-13, low_memory=low_memory)


class _AttentionWithoutRule(nn.MultiheadAttention):
    """``MultiheadAttention`` with a ``forward`` of its own (the same computation): a registered
    rule applies only to its class's own ``forward``, so the generic rule re-runs this one."""

    def forward(self, *args, **kwargs):  # type: ignore[override]
        return super().forward(*args, **kwargs)


@pytest.mark.parametrize("low_memory", [False, True], ids=["held", "low_memory"])
def test_shared_input_of_batch_size_given_to_a_re_run_module(low_memory: bool) -> None:
    """A causal mask ``[L, L]`` with ``L`` equal to the batch size, given to a re-run module
    (an attention without a layer rule): the per-sample re-run slices it as if it indexed the
    samples, and fails under ``torch.func`` (it crashed once). The generic rule then re-runs the
    module on the whole batch, eagerly, each sample's rows from its masked output gradient:
    exact, on the per-sample path (one backward row), without a route warning."""
    torch.manual_seed(0)
    attention = _AttentionWithoutRule(6, 2, dropout=0.0, batch_first=True).double()
    x = torch.randn(4, 4, 6, dtype=torch.float64)  # batch 4, length 4
    mask = torch.triu(torch.full((4, 4), float("-inf"), dtype=torch.float64), diagonal=1)

    def losses() -> Tensor:
        out = attention(x, x, x, attn_mask=mask, need_weights=False)[0]
        return out.pow(2).sum((1, 2))

    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        check_gramian(attention, losses, 0, rtol=1e-10, low_memory=low_memory)
        check_step(attention, losses, 0, rtol=1e-8, low_memory=low_memory)
        with Engine(attention, batch_dim=0) as e:
            step = e.step(losses(), trainable(attention), [], per_sample=True)
    assert (step.batch_dim, step.b, step.T) == (0, 4, 1)
