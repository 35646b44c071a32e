"""The ``nn.MultiheadAttention`` rule against the explicit Jacobian of the same losses.

Each configuration of the module (``batch_first`` both ways; packed self-attention, cross
attention with ``key is value``, three different inputs; separate q/k/v weights from other key
and value widths; no bias; ``add_zero_attn``; key padding, boolean and float attention masks,
``is_causal``; ``need_weights`` both ways, per-head weights; attention dropout in train mode)
sits in a small model (a ``Linear`` before it, so its inputs carry a graph, and a head after
it; the losses read the attention weights too where they are returned). From one forward
(float64) three loss layouts are checked: per-sample, ``[batch, tasks]`` and task losses. The
oracle is ``J Jᵀ`` of one ``autograd.grad`` per loss on the same graph, so on the same dropout
masks; the engine's Gramian and a ``JDOptimizer`` step's ``.grad`` (UPGrad) must equal it, the
call must go through the rule (not the generic re-run) and no ``EngineRouteWarning`` may be
raised (an error in this file).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram import Engine
from jdoptim.autogram.rules import GenericRule
from jdoptim.autogram.rules.attention import MultiheadAttentionRule

from ._oracle import as_square, explicit_jacobian

pytestmark = pytest.mark.filterwarnings("error::jdoptim.autogram.EngineRouteWarning")

E, HEADS, B, L, S = 8, 2, 3, 4, 5


@dataclass(frozen=True)
class Config:
    batch_first: bool = True
    inputs: str = "self"  # "self" (q is k is v), "kv" (k is v, not q), "three" (all different)
    kdim: int | None = None  # other key/value widths: separate q/k/v weights
    bias: bool = True
    add_zero_attn: bool = False
    dropout: float = 0.0
    need_weights: bool = True
    average_attn_weights: bool = True
    masks: tuple[str, ...] = ()  # "padding", "bool", "float", "causal"
    extra: dict = field(default_factory=dict)


CONFIGS = {
    "self": Config(),
    "self_seq_first": Config(batch_first=False),
    "self_no_weights": Config(need_weights=False),
    "cross_kv": Config(inputs="kv"),
    "three_inputs": Config(inputs="three"),
    "separate_weights": Config(inputs="three", kdim=6),
    "no_bias": Config(bias=False, inputs="kv"),
    "zero_attn": Config(add_zero_attn=True),
    "padding_mask": Config(masks=("padding",)),
    "bool_mask_no_weights": Config(masks=("bool", "padding"), need_weights=False),
    "float_mask_per_head": Config(masks=("float",), average_attn_weights=False),
    "causal_no_weights": Config(masks=("causal",), need_weights=False),
    "dropout": Config(dropout=0.3),
    "dropout_no_weights": Config(dropout=0.3, need_weights=False),
    "dropout_seq_first_cross": Config(dropout=0.3, batch_first=False, inputs="kv"),
    "dropout_separate_masked": Config(dropout=0.3, inputs="three", kdim=6, masks=("padding",)),
}


class Attender(nn.Module):
    """``Linear`` → ``MultiheadAttention`` → head: ``[b, L, 5]`` (or ``[L, b, 5]``) to
    ``[b, 2]`` losses."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        kdim = config.kdim or E
        self.embed_q = nn.Linear(5, E)
        self.embed_k = nn.Linear(5, kdim)
        self.embed_v = nn.Linear(5, kdim)
        self.attn = nn.MultiheadAttention(
            E,
            HEADS,
            dropout=config.dropout,
            bias=config.bias,
            add_zero_attn=config.add_zero_attn,
            kdim=config.kdim,
            vdim=config.kdim,
            batch_first=config.batch_first,
        )
        self.head = nn.Linear(E, 2)

    def forward(self, x: Tensor, memory: Tensor, other: Tensor) -> Tensor:
        c = self.config
        q = self.embed_q(x)
        k = q if c.inputs == "self" else self.embed_k(memory)
        v = k if c.inputs in ("self", "kv") else self.embed_v(other)
        out, weights = self.attn(q, k, v, need_weights=c.need_weights, **self._masks(q, k))
        seq = 1 if c.batch_first else 0  # the samples on the other dimension of L, N
        first = out.pow(2).mean((seq, 2))
        second = self.head(out).sin().sum((seq, 2))
        if weights is not None:  # [N, ...] whatever batch_first
            second = second + weights.pow(2).flatten(1).sum(1)
        return torch.stack([first, second], 1)  # [b, 2]

    def _masks(self, q: Tensor, k: Tensor) -> dict:
        c = self.config
        l, s = (q.shape[1], k.shape[1]) if c.batch_first else (q.shape[0], k.shape[0])
        kwargs: dict = {"average_attn_weights": c.average_attn_weights}
        if "padding" in c.masks:
            padding = torch.zeros(B, s, dtype=torch.bool)
            padding[0, -2:] = padding[2, -1] = True
            kwargs["key_padding_mask"] = padding
        if "bool" in c.masks:
            kwargs["attn_mask"] = torch.ones(l, s, dtype=torch.bool).triu(2)
        if "float" in c.masks:
            kwargs["attn_mask"] = torch.linspace(-1, 1, l * s, dtype=torch.float64).view(l, s)
        if "causal" in c.masks:
            kwargs["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(l).double()
            kwargs["is_causal"] = True
        return kwargs


def _inputs(config: Config) -> tuple[Tensor, Tensor, Tensor]:
    seq_k = L if config.inputs == "self" or "causal" in config.masks else S
    tensors = (torch.randn(B, L, 5), torch.randn(B, seq_k, 5), torch.randn(B, seq_k, 5))
    tensors = tuple(t.double() for t in tensors)
    if not config.batch_first:
        tensors = tuple(t.transpose(0, 1) for t in tensors)
    return tensors  # type: ignore[return-value]


LAYOUTS = {
    "per_sample": (lambda losses: losses[:, 0], True),
    "batch_tasks": (lambda losses: losses, True),
    "tasks": (lambda losses: losses.mean(0), False),
}


def _square(gramian: Tensor, shape: torch.Size) -> Tensor:
    """A step's Gramian ``[b·T, b·T]`` (losses in row-major order) or generalized one, square."""
    return gramian if gramian.dim() == 2 else as_square(gramian, tuple(shape))


def _relative_error(actual: Tensor, expected: Tensor) -> float:
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def _check(model: Attender, layout: str, rule: type = MultiheadAttentionRule) -> None:
    """Engine Gramian, the rule that took the call, and a JDOptimizer step's ``.grad``."""
    pick, per_sample = LAYOUTS[layout]
    batch_dim = 0 if per_sample else None
    params = list(model.parameters())
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=batch_dim, scope="all"
    )
    inputs = _inputs(model.config)
    with Engine(model, batch_dim=batch_dim) as engine:
        losses = pick(model(*inputs))
        jacobian = explicit_jacobian(losses, params)
        expected = jacobian @ jacobian.T
        # (unused projections among params: assume_reached=False takes them as unreached)
        step = engine.step(
            losses, params, [], per_sample=per_sample, retain_graph=True, assume_reached=False
        )
        with torch.no_grad():
            gramian = _square(step.gramian(), losses.shape)
        kinds = {type(r.rule) for r in step.rule_parameters if r.rule.call.module is model.attn}
    assert kinds == {rule}
    assert _relative_error(gramian, expected) < 1e-10
    opt.zero_grad()
    record = opt.step(losses)
    weights = UPGradWeighting()(expected)
    torch.testing.assert_close(record.weights.reshape(-1).double(), weights, atol=1e-6, rtol=1e-6)
    grads = torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]
    )
    assert _relative_error(grads, jacobian.T @ record.weights.reshape(-1).double()) < 1e-10


def _cases() -> list[tuple[str, str]]:
    """Every configuration and layout; ``batch_first=False`` modules in task mode only (their
    per-sample mode needs ``batch_dim=1`` for the whole model, losses included)."""
    return [
        (name, layout)
        for name, config in CONFIGS.items()
        for layout, (_, per_sample) in LAYOUTS.items()
        if config.batch_first or not per_sample
    ]


@pytest.mark.parametrize("name, layout", _cases())
def test_attention_rule(name: str, layout: str) -> None:
    torch.manual_seed(0)
    _check(Attender(CONFIGS[name]).double().train(), layout)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bias_kv_goes_through_the_generic_rule(layout: str) -> None:
    """``add_bias_kv`` (concatenated, not projected): the generic rule takes the call, exactly."""
    torch.manual_seed(0)
    model = Attender(Config()).double().train()
    model.attn = nn.MultiheadAttention(E, HEADS, add_bias_kv=True, batch_first=True).double()
    _check(model, layout, rule=GenericRule)


def test_unbatched_task_losses() -> None:
    """An unbatched ``[L, E]`` call (task losses only), with dropout."""
    torch.manual_seed(0)
    attn = nn.MultiheadAttention(E, HEADS, dropout=0.3).double().train()
    embed = nn.Linear(5, E).double()
    model = nn.ModuleDict({"embed": embed, "attn": attn})
    x = torch.randn(L, 5, dtype=torch.float64)
    with Engine(model, batch_dim=None) as engine:
        h = embed(x)
        out, weights = attn(h, h, h)
        losses = torch.stack([out.pow(2).sum(), out.sin().sum() + weights.pow(2).sum()])
        jacobian = explicit_jacobian(losses, list(model.parameters()))
        gramian = engine.compute_gramian(losses)
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-10


def test_user_random_stream_untouched() -> None:
    """The rule's re-run restores the call's generator state inside ``fork_rng``: the user's
    stream after a step is where the forward left it."""
    torch.manual_seed(0)
    model = Attender(CONFIGS["dropout"]).double().train()
    inputs = _inputs(model.config)
    with Engine(model, batch_dim=0) as engine:
        losses = model(*inputs)[:, 0]
        before = torch.get_rng_state()
        with torch.no_grad():
            engine.step(
                losses, list(model.parameters()), [], per_sample=True, assume_reached=False
            ).gramian()
        assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_transformer_encoder_layer_default_dropout_uses_the_rule(layout: str) -> None:
    """``nn.TransformerEncoderLayer`` with its default ``dropout=0.1`` in train mode: the
    attention goes through the rule, exactly, with no route warning."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, HEADS, 16, batch_first=True).double().train()
    x = torch.randn(B, L, E, dtype=torch.float64)
    pick, per_sample = LAYOUTS[layout]
    params = list(layer.parameters())
    with Engine(layer, batch_dim=0 if per_sample else None) as engine:
        out = layer(x)
        losses = pick(torch.stack([out.pow(2).mean((1, 2)), out.sin().sum((1, 2))], 1))
        jacobian = explicit_jacobian(losses, params)
        step = engine.step(losses, params, [], per_sample=per_sample, retain_graph=True)
        with torch.no_grad():
            gramian = _square(step.gramian(), losses.shape)
        kinds = {type(r.rule).__name__ for r in step.rule_parameters}
    assert "MultiheadAttentionRule" in kinds and "GenericRule" not in kinds
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-10


def test_mask_of_batch_size_goes_through_the_rule() -> None:
    """A causal ``[L, L]`` mask with ``L`` equal to the batch size: the rule re-runs the whole
    call (nothing is sliced per sample), so the step stays per-sample (``b`` samples, one
    backward row), exact and without a route warning."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(6, 2, batch_first=True).double()
    x = torch.randn(4, 4, 6, dtype=torch.float64)  # batch 4, length 4
    mask = torch.triu(torch.full((4, 4), float("-inf"), dtype=torch.float64), diagonal=1)
    params = list(attention.parameters())
    with Engine(attention, batch_dim=0) as engine:
        losses = attention(x, x, x, attn_mask=mask, need_weights=False)[0].pow(2).sum((1, 2))
        jacobian = explicit_jacobian(losses, params)
        step = engine.step(losses, params, [], per_sample=True, retain_graph=True)
        with torch.no_grad():
            gramian = step.gramian()
    assert (step.batch_dim, step.b, step.T) == (0, 4, 1)
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-10


@pytest.mark.parametrize("per_sample", [True, False])
def test_attention_called_twice(per_sample: bool) -> None:
    """One module called twice in a forward (its parameters' rows summed over the calls, from
    the rule's ``jacobians``), with dropout."""
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(E, HEADS, dropout=0.3, batch_first=True).double().train()
    x = torch.randn(B, L, E, dtype=torch.float64)
    params = list(attention.parameters())
    with Engine(attention, batch_dim=0 if per_sample else None) as engine:
        h = attention(x, x, x)[0]
        out = attention(h.tanh(), x, x, need_weights=False)[0]
        losses = torch.stack([out.pow(2).mean((1, 2)), out.sin().sum((1, 2))], 1)
        losses = losses[:, 0] if per_sample else losses.mean(0)
        jacobian = explicit_jacobian(losses, params)
        step = engine.step(losses, params, [], per_sample=per_sample, retain_graph=True)
        with torch.no_grad():
            gramian = step.gramian()
        kinds = {type(r.rule) for r in step.rule_parameters}
    assert kinds == {MultiheadAttentionRule}
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-10


def test_projection_not_found_takes_autograd_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """If the re-run records no product for some parameter (as a torch version that projects
    otherwise would), the rule raises, and the engine's check gives the module autograd's rows:
    a route warning, and the Gramian still exact."""
    from jdoptim.autogram import EngineRouteWarning
    from jdoptim.autogram.rules import attention as rule_module

    original = rule_module._Recorder.linear

    def forgetful(self, x, weight, bias=None):  # the output projection goes unrecorded
        if weight.shape[0] == weight.shape[1] and weight._base is None:
            return torch._C._nn.linear(x, weight, bias)
        return original(self, x, weight, bias)

    monkeypatch.setattr(rule_module._Recorder, "linear", forgetful)
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(E, HEADS, dropout=0.3, batch_first=True).double().train()
    x = torch.randn(B, L, E, dtype=torch.float64)
    params = list(attention.parameters())
    with Engine(attention, batch_dim=0) as engine:
        losses = attention(x, x, x)[0].pow(2).mean((1, 2))
        jacobian = explicit_jacobian(losses, params)
        with pytest.warns(EngineRouteWarning, match="unexpected torch version"):
            gramian = engine.compute_gramian(losses)
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-10
