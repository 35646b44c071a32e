"""Every registered rule agrees with the torch.func fallback, and both with the oracle."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import jdoptim.autogram.rules as rules
from jdoptim.autogram import Engine
from jdoptim.autogram.rules._contraction import (
    contraction_cost,
    explicit_cost,
    fewest_entries,
    gramian_from_kernel,
    linear_kernel,
    linear_rows,
    takes_contraction,
    weight_and_bias_gramian,
)

from ._oracle import as_square, assert_gramian_close, explicit_gramian, explicit_jacobian

LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), lambda: torch.randn(3, 5)),
    "linear_seq": (lambda: nn.Linear(5, 4), lambda: torch.randn(3, 6, 5)),
    "conv2d": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), lambda: torch.randn(3, 2, 7, 7)),
    "conv1d": (lambda: nn.Conv1d(2, 3, 2, dilation=2), lambda: torch.randn(3, 2, 8)),
    "embedding": (lambda: nn.Embedding(7, 4, padding_idx=1), lambda: torch.randint(0, 7, (3, 5))),
    "layernorm": (lambda: nn.LayerNorm(5), lambda: torch.randn(3, 4, 5)),
    "layernorm_flat": (lambda: nn.LayerNorm(5), lambda: torch.randn(3, 5)),
    "batchnorm1d_eval": (lambda: nn.BatchNorm1d(5).eval(), lambda: torch.randn(3, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), lambda: torch.randn(3, 4, 3, 3)),
    "batchnorm_eval": (lambda: nn.BatchNorm2d(4).eval(), lambda: torch.randn(3, 4, 3, 3)),
}
if hasattr(nn, "RMSNorm"):
    LAYERS["rmsnorm"] = (lambda: nn.RMSNorm(5), lambda: torch.randn(3, 4, 5))
LAYERS |= {
    "conv2d_grouped": (
        lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
        lambda: torch.randn(3, 4, 5, 5),
    ),
    "conv2d_depthwise": (
        lambda: nn.Conv2d(4, 8, 3, stride=2, groups=4, bias=False),
        lambda: torch.randn(3, 4, 6, 6),
    ),
    "conv1d_depthwise_same": (
        lambda: nn.Conv1d(3, 3, 4, padding="same", groups=3),
        lambda: torch.randn(3, 3, 7),
    ),
    "conv2d_reflect": (
        lambda: nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        lambda: torch.randn(3, 2, 5, 5),
    ),
    "conv1d_circular_grouped": (
        lambda: nn.Conv1d(4, 2, 3, padding=2, dilation=2, padding_mode="circular", groups=2),
        lambda: torch.randn(3, 4, 6),
    ),
    "layernorm_no_bias": (lambda: nn.LayerNorm(5, bias=False), lambda: torch.randn(3, 4, 5)),
    "conv2d_patchify": (lambda: nn.Conv2d(2, 3, 2, stride=2), lambda: torch.randn(3, 2, 7, 6)),
    "conv1d_patchify": (lambda: nn.Conv1d(2, 3, 3, stride=3), lambda: torch.randn(3, 2, 9)),
}


def _transformers_layer(module_path: str, name: str, *args) -> nn.Module:
    module = pytest.importorskip(module_path)
    return getattr(module, name)(*args)


LAYERS |= {
    "hf_conv1d": (
        lambda: _transformers_layer("transformers.pytorch_utils", "Conv1D", 4, 5),
        lambda: torch.randn(3, 6, 5),
    ),
    "hf_conv1d_flat": (
        lambda: _transformers_layer("transformers.pytorch_utils", "Conv1D", 4, 5),
        lambda: torch.randn(3, 5),
    ),
    "hf_llama_rmsnorm": (
        lambda: _transformers_layer("transformers.models.llama.modeling_llama", "LlamaRMSNorm", 5),
        lambda: torch.randn(3, 4, 5) * 2,
    ),
    "hf_mistral_rmsnorm": (
        lambda: _transformers_layer(
            "transformers.models.mistral.modeling_mistral", "MistralRMSNorm", 5
        ),
        lambda: torch.randn(3, 4, 5),
    ),
    "hf_t5_layernorm": (
        lambda: _transformers_layer("transformers.models.t5.modeling_t5", "T5LayerNorm", 5),
        lambda: torch.randn(3, 4, 5) * 2,
    ),
}


def _gramian(layer: nn.Module, x: Tensor, shape: str, batch_dim: int | None) -> tuple:
    with Engine(layer, batch_dim=batch_dim) as engine:
        out = layer(x)
        if shape == "matrix":
            losses = out.reshape(out.shape[0], -1)[:, :2].sin()
        else:
            losses = out.sin().reshape(out.shape[0], -1).sum(1)
        expected = explicit_gramian(losses, engine.parameters())
        return as_square(engine.compute_gramian(losses), losses.shape), expected


@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("shape", ["vector", "matrix"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_rule_matches_fallback_and_oracle(
    name: str, shape: str, batch_dim: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_layer, make_input = LAYERS[name]
    layer, x = make_layer(), make_input()
    with torch.no_grad():
        for p in layer.parameters():  # non-trivial affine parameters for the norms
            p.add_(torch.randn_like(p) * 0.3)
    assert rules.registered_rule(layer) is not None
    used = []
    original = rules.make_rule
    monkeypatch.setattr(rules, "make_rule", lambda call: used.append(original(call)) or used[-1])
    monkeypatch.setattr("jdoptim.autogram._step.make_rule", rules.make_rule)
    with_rule, expected = _gramian(layer, x, shape, batch_dim)
    assert not isinstance(used[-1], rules.GenericRule), "the rule did not apply"
    monkeypatch.setattr(rules, "registered_rule", lambda module: None)
    with_fallback, _ = _gramian(layer, x, shape, batch_dim)
    assert isinstance(used[-1], rules.GenericRule)
    assert_gramian_close(with_rule, with_fallback)
    assert_gramian_close(with_rule, expected)


@pytest.mark.parametrize("b,s,t", [(1, 5, 3), (4, 1, 2), (3, 4, 2), (2, 3, 1), (3, 2, 2)])
def test_contraction_equals_rows(b: int, s: int, t: int) -> None:
    """Both branches of the cost model: the kernel contraction and the explicit rows; the
    contraction with positions by ``K ⊙ ⟨D, D⟩`` (``T·S ≤ o``: ``(2, 3, 1)``, ``(3, 2, 2)``) and by
    ``⟨D, K D⟩`` (``(3, 4, 2)``)."""
    inputs = torch.randn(b, s, 6, dtype=torch.float64)
    grads = torch.randn(t, b, s, 5, dtype=torch.float64)
    rows = torch.stack(
        [
            torch.stack(
                [sum(torch.outer(grads[k, i, r], inputs[i, r]) for r in range(s)) for k in range(t)]
            )
            for i in range(b)
        ]
    )  # the per-sample, per-row weight gradients by their definition
    torch.testing.assert_close(linear_rows(inputs, grads), rows)
    flat = rows.reshape(b * t, -1)
    expected = (flat @ flat.T).view(b, t, b, t)
    torch.testing.assert_close(gramian_from_kernel(linear_kernel(inputs), grads), expected)


@pytest.mark.parametrize("which", ["weight", "bias", "both"])
@pytest.mark.parametrize(
    "b,s,t", [(1, 5, 3), (4, 1, 2), (3, 4, 2), (5, 1, 1), (1, 7, 1), (4, 3, 1)]
)
def test_weight_and_bias_gramian_by_definition(b: int, s: int, t: int, which: str) -> None:
    """The bias folded into the kernel (``K + 1``) or added as rows, on both branches of the cost
    model, equals the Gram matrix of the per-row gradients ``[vec(Σ_s D aᵀ), Σ_s D]``."""
    inputs = torch.randn(b, s, 6, dtype=torch.float64)
    grads = torch.randn(t, b, s, 5, dtype=torch.float64)
    weight, bias = torch.empty(5, 6), torch.empty(5)
    params = {"weight": [weight], "bias": [bias], "both": [weight, bias]}[which]
    pieces = []
    if which != "bias":
        pieces.append(torch.einsum("kiso,isd->ikod", grads, inputs).reshape(b, t, -1))
    if which != "weight":
        pieces.append(grads.sum(2).transpose(0, 1))
    rows = torch.cat(pieces, dim=2).reshape(b * t, -1)
    expected = (rows @ rows.T).view(b, t, b, t)
    torch.testing.assert_close(weight_and_bias_gramian(inputs, grads, params, weight), expected)


def test_the_low_memory_step_picks_the_method_of_fewest_entries() -> None:
    """A ViT MLP layer per sample (``b = 16``, 17 positions, ``64 → 256``): the explicit rows
    take fewer flops, the contraction forms fewer entries (``K`` and ``P``, 148 k against the
    rows' 262 k); inside :func:`fewest_entries` the contraction is taken, and both choices
    give the Gramian of the rows by definition."""
    b, s, t, d, o = 16, 17, 1, 64 + 1, 256
    assert not takes_contraction(b, s, t, d, o)
    with fewest_entries():
        assert takes_contraction(b, s, t, d, o)
    assert not takes_contraction(b, s, t, d, o)  # the block's choice does not leak
    # a smaller shape where the two choices differ too: both give the Gramian by definition
    b, s, d, o = 8, 8, 32, 32
    assert not takes_contraction(b, s, 1, d + 1, o)
    with fewest_entries():
        assert takes_contraction(b, s, 1, d + 1, o)
    inputs = torch.randn(b, s, d, dtype=torch.float64)
    grads = torch.randn(1, b, s, o, dtype=torch.float64)
    weight, bias = torch.empty(o, d), torch.empty(o)
    rows = torch.cat(
        [
            torch.einsum("kiso,isd->ikod", grads, inputs).reshape(b, 1, -1),
            grads.sum(2).transpose(0, 1),
        ],
        dim=2,
    ).reshape(b, -1)
    expected = (rows @ rows.T).view(b, 1, b, 1)
    by_flops = weight_and_bias_gramian(inputs, grads, [weight, bias], weight)
    with fewest_entries():
        by_entries = weight_and_bias_gramian(inputs, grads, [weight, bias], weight)
    torch.testing.assert_close(by_flops, expected)
    torch.testing.assert_close(by_entries, expected)


@pytest.mark.parametrize("b,s,t", [(1, 5, 3), (5, 1, 1), (3, 4, 2)])
def test_weight_and_bias_gramian_of_non_contiguous_tensors(b: int, s: int, t: int) -> None:
    """Inputs and output gradients that are strided views (a sample dimension moved first) give
    the same Gramian as their contiguous copies, on the per-sample and per-task fast paths."""
    inputs = torch.randn(s, b, 6, dtype=torch.float64).transpose(0, 1)
    grads = torch.randn(t, s, b, 5, dtype=torch.float64).transpose(1, 2)
    weight, bias = torch.empty(5, 6), torch.empty(5)
    expected = weight_and_bias_gramian(
        inputs.contiguous(), grads.contiguous(), [weight, bias], weight
    )
    torch.testing.assert_close(
        weight_and_bias_gramian(inputs, grads, [weight, bias], weight), expected
    )


def test_both_branches_of_the_cost_model_are_exercised() -> None:
    """The shapes above reach the explicit rows (b=1, s=7, t=1 with a bias: d + 1 = 7) and the
    contraction (b=4, s=1)."""
    assert explicit_cost(1, 7, 1, 7, 5) < contraction_cost(1, 7, 1, 7, 5)
    assert contraction_cost(4, 1, 2, 7, 5) < explicit_cost(4, 1, 2, 7, 5)


def test_weighted_update_of_each_rule() -> None:
    """The update Σ wᵢ∇ℓᵢ from the rules equals the explicit wᵀJ (per-sample, batch_dim=0)."""
    model = nn.Sequential(
        nn.Conv1d(2, 3, 2), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(9, 4), nn.LayerNorm(4)
    )
    x = torch.randn(5, 2, 4)
    engine = Engine(model, batch_dim=0)
    losses = model(x).sin().sum(1)
    params = engine.parameters()
    weights = torch.rand(5)
    expected = torch.autograd.grad(losses, params, weights, retain_graph=True)
    step = engine.step(losses, params, [], per_sample=True)
    shared, _ = step.gradients(weights)
    for a, e in zip(shared, expected):
        torch.testing.assert_close(a, e)
    engine.close()


@pytest.mark.parametrize("batch_dim", [None, 0])
@pytest.mark.parametrize("name", list(LAYERS))
def test_weighted_update_of_every_rule(name: str, batch_dim: int | None) -> None:
    """Each rule's ``Σ wᵢ ∇ℓᵢ`` equals autograd's weighted gradient ``wᵀJ`` (in float64), per
    sample and for task losses, for both layouts of the Linear-like weight."""
    make_layer, make_input = LAYERS[name]
    layer, x = make_layer().double(), make_input()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    with Engine(layer, batch_dim=batch_dim) as engine:
        out = layer(x)
        losses = out.sin().reshape(out.shape[0], -1).sum(1)
        params = engine.parameters()
        weights = torch.rand(losses.shape[0], dtype=torch.float64)
        expected = torch.autograd.grad(losses, params, weights, retain_graph=True)
        step = engine.step(losses, params, [], per_sample=batch_dim is not None)
        with torch.no_grad():
            shared, _ = step.gradients(weights)
        assert not any(isinstance(r.rule, rules.GenericRule) for r in step.rule_parameters)
    for actual, wanted in zip(shared, expected):
        torch.testing.assert_close(actual, wanted)


class _Scaled(nn.Linear):
    """Overrides ``forward``: the Linear rule must not be used for it."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * 2.0


class _KeepsForward(nn.Linear):
    pass


def test_registry_respects_overridden_forward() -> None:
    assert rules.registered_rule(_KeepsForward(2, 3)) is rules.linear.LinearRule
    assert rules.registered_rule(_Scaled(2, 3)) is None
    patched = nn.Linear(2, 3)
    patched.forward = lambda x: nn.functional.linear(x, patched.weight * 2)  # type: ignore[method-assign]
    assert rules.registered_rule(patched) is None


def test_register_by_qualified_name_and_bad_registrations() -> None:
    class Local(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(3, 2))

        def forward(self, x: Tensor) -> Tensor:
            return x @ self.weight.T

    assert rules.registered_rule(Local()) is None
    name = rules.qualified_name(Local)
    try:

        @rules.register_rule(name)
        class LocalRule(rules.LinearLikeRule):
            pass

        assert rules.registered_rule(Local()) is LocalRule
        layer, x = Local(), torch.randn(4, 2)
        with Engine(layer, batch_dim=0) as engine:
            losses = layer(x).sin().sum(1)
            expected = explicit_gramian(losses, engine.parameters())
            assert_gramian_close(engine.compute_gramian(losses), expected)
    finally:
        rules._base._NAMED_RULES.pop(name, None)
        rules._base._CACHE.clear()
    with pytest.raises(TypeError, match="qualified class names"):
        rules.register_rule(3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LayerRule subclasses"):
        rules.register_rule(nn.Linear)(object)  # type: ignore[arg-type]


def test_lazy_rules_do_not_import_transformers() -> None:
    import subprocess
    import sys

    code = (
        "import sys, jdoptim, jdoptim.autogram.rules as r; "
        "assert 'transformers' not in sys.modules; "
        "assert any(n.startswith('transformers.') for n in r._base._NAMED_RULES)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_custom_rule_example() -> None:
    """examples/custom_rule.py: its rules are the ones used (never the generic one), exact for
    per-sample and task losses against the explicit Jacobian, and the script's training runs."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "examples" / "custom_rule.py"
    spec = importlib.util.spec_from_file_location("custom_rule_example", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(1)
    model = example.Model().double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)  # several positions per sample
    for batch_dim in (0, None):
        with Engine(model, batch_dim=batch_dim) as engine:
            losses = model(x).sin()[:, :2]  # [batch, tasks]
            params = engine.parameters()
            expected = explicit_gramian(losses, params)
            step = engine.step(losses, params, [], per_sample=batch_dim is not None)
            kinds = {type(r.rule) for r in step.rule_parameters}
            assert kinds == {example.ProjectionRule, example.ChannelScaleRule}
            with torch.no_grad():
                actual = step.gramian()
            assert_gramian_close(actual, expected, rtol=1e-12)
    assert example.main(steps=3) > 0


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_embedding_rows_by_definition(batch_dim: int | None) -> None:
    """The Embedding rule's rows (used when its weight is tied) equal autograd's gradient of each
    loss, with repeated and padding indices."""
    layer = nn.Embedding(6, 3, padding_idx=2).double()
    index = torch.tensor([[0, 2, 0, 5], [2, 2, 1, 0], [4, 5, 5, 3]])
    with Engine(layer, batch_dim=batch_dim) as engine:
        losses = layer(index).sin().sum((1, 2))
        expected = torch.stack(
            [torch.autograd.grad(loss, layer.weight, retain_graph=True)[0] for loss in losses]
        )
        step = engine.step(losses, [layer.weight], [], per_sample=batch_dim is not None)
        (parts,) = step.rule_parameters
        assert isinstance(parts.rule, rules.embedding.EmbeddingRule)
        with torch.no_grad():
            (rows,) = parts.rule.jacobians([layer.weight])
    torch.testing.assert_close(rows.reshape(3, 6, 3), expected)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("size, rows", [(6, True), (400, False)])
def test_embedding_gramian_and_update_by_rows_or_by_kernel(
    size: int, rows: bool, per_sample: bool
) -> None:
    """A small table read at many positions takes the explicit rows (held for the update), a
    vocabulary the index kernel; both give the explicit Jacobian's Gramian and update."""
    torch.manual_seed(0)
    layer = nn.Embedding(size, 3, padding_idx=2).double()
    index = torch.randint(0, 6, (3, 5))
    with Engine(layer, batch_dim=0 if per_sample else None) as engine:
        out = layer(index).sin()
        losses = out.sum((1, 2)) if per_sample else out.sum((0, 1))
        jacobian = explicit_jacobian(losses, [layer.weight])
        step = engine.step(losses, [layer.weight], [], per_sample=per_sample)
        (parts,) = step.rule_parameters
        assert parts.rule.rows_are_cheaper() is rows
        weights = torch.randn(losses.numel(), dtype=torch.float64)
        with torch.no_grad():
            gramian = step.gramian()
            assert (step.held.matrix is not None) is rows
            (update,), _ = step.gradients(weights)
    assert_gramian_close(gramian, jacobian @ jacobian.T, rtol=1e-12)
    torch.testing.assert_close(update.reshape(-1), weights @ jacobian)


_CONVS = [
    (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1), (4, 3, 9, 9), 1),
    (lambda: nn.Conv2d(2, 4, (2, 3), padding=(1, 0), dilation=2), (3, 2, 8, 7), 1),
    (lambda: nn.Conv1d(2, 3, 3, padding="same", padding_mode="replicate"), (5, 2, 11), 1),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, bias=False), (3, 4, 6, 6), 2),
]


@pytest.mark.parametrize("layout", ["tasks", "per-sample", "batch x tasks"])
@pytest.mark.parametrize(
    "make_layer, shape, route",
    [
        (make, shape, route)
        for make, shape, groups in _CONVS
        for route in ("direct rows", "im2col rows", "im2col kernel")
        if groups == 1 or route != "im2col kernel"  # grouped: always the weight rows
    ],
)
def test_conv_routes_match_the_explicit_jacobian(
    make_layer, shape, layout: str, route: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every route of the convolution rule, whichever the cost model would pick: the weight rows
    from the convolution's own weight-gradient kernel (vmapped over the rows) or from the im2col
    columns, and the kernel contraction of the columns (ungrouped only), per sample and per
    task, against the Gram matrix of the explicit Jacobian of the same losses."""
    from jdoptim.autogram.rules.conv import ConvRule

    torch.manual_seed(0)
    layer = make_layer().double()
    monkeypatch.setattr(ConvRule, "_rows_cheaper", lambda self, bias: route != "im2col kernel")
    monkeypatch.setattr(ConvRule, "_direct_rows", lambda self: route == "direct rows")
    x = torch.randn(*shape, dtype=torch.float64)
    with Engine(layer, batch_dim=None if layout == "tasks" else 0) as engine:
        out = layer(x)
        flat = out.reshape(out.shape[0], -1)
        if layout == "tasks":
            losses = flat[:, :3].cos().sum(0)  # [3]
        elif layout == "per-sample":
            losses = flat.sin().sum(1)  # [b]
        else:
            losses = torch.stack([flat.sin().sum(1), flat[:, 1:].cos().sum(1)], dim=1)  # [b, 2]
        expected = explicit_gramian(losses, engine.parameters())
        gramian = as_square(engine.compute_gramian(losses), losses.shape)
    assert_gramian_close(gramian, expected)


_READ_NORMS = ["hf_llama_rmsnorm", "hf_t5_layernorm", "layernorm", "groupnorm", "batchnorm_eval"]


@pytest.mark.parametrize("name", _READ_NORMS + (["rmsnorm"] if "rmsnorm" in LAYERS else []))
def test_norms_read_their_normalised_input_from_the_graph(name: str) -> None:
    """RMS norms end with ``γ ⊙ X̂``: the rule takes ``X̂`` from that product's autograd node
    (bitwise what a recompute gives); LayerNorm's and GroupNorm's kernels saved ``μ, 1/σ``,
    from which ``X̂`` is two operations; BatchNorm leaves nothing, and its rule recomputes."""
    from jdoptim.autogram.rules.norm import _normalised, _Statistics

    make_layer, make_input = LAYERS[name]
    layer, x = make_layer().double(), make_input().double()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.3)
    with Engine(layer, batch_dim=0) as engine:
        out = layer(x)
        read = rules.registered_rule(layer).read_graph(layer, out.grad_fn)
        expected_normalised = _normalised(layer, x)
        if name == "batchnorm_eval":
            assert read is None
        elif isinstance(read, _Statistics):
            assert name in ("layernorm", "groupnorm")
            torch.testing.assert_close(read.normalised(x, layer), expected_normalised)
        else:
            assert torch.equal(read, expected_normalised)
        losses = out.sin().reshape(out.shape[0], -1).sum(1)
        expected = explicit_gramian(losses, engine.parameters())
        assert_gramian_close(engine.compute_gramian(losses), expected, rtol=1e-12)


def test_a_product_of_the_weight_with_itself_is_not_read_as_normalised() -> None:
    """The read needs the very weight times one other tensor; a freed node gives nothing."""
    from jdoptim.autogram.rules.norm import _multiplied_by

    weight = nn.Parameter(torch.randn(5))
    other = torch.randn(3, 5)
    assert torch.equal(_multiplied_by((weight * other).grad_fn, weight), other)
    assert torch.equal(_multiplied_by((other * weight).grad_fn, weight), other)
    assert _multiplied_by((weight * weight).grad_fn, weight) is None
    twin = weight.detach().clone().requires_grad_()
    assert _multiplied_by((twin * other).grad_fn, weight) is None
    assert _multiplied_by((weight + other).grad_fn, weight) is None
    product = weight * other
    product.sum().backward()
    assert _multiplied_by(product.grad_fn, weight) is None


class _CheckpointedNorm(nn.Module):
    """A Linear and transformers' Llama norm inside one non-reentrant checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(5, 5)
        llama = "transformers.models.llama.modeling_llama"
        self.norm = _transformers_layer(llama, "LlamaRMSNorm", 5)
        self.calls = 0  # runs of the checkpointed function: the forward and its recomputations

    def _inner(self, x: Tensor) -> Tensor:
        self.calls += 1
        return self.norm(self.linear(x))

    def forward(self, x: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(self._inner, x, use_reentrant=False)


def _checkpointed_step(model: _CheckpointedNorm, x: Tensor) -> tuple[int, Tensor, Tensor]:
    """The checkpointed function's runs during one Engine step, its Gramian and the explicit
    one."""
    with Engine(model, batch_dim=0) as engine:
        losses = model(x).sin().sum((1, 2))
        before = model.calls
        gramian = engine.compute_gramian(losses)
        calls = model.calls - before
        again = model(x).sin().sum((1, 2))  # (the same losses: no randomness in the model)
        return calls, gramian, explicit_gramian(again, engine.parameters())


def test_a_checkpointed_norm_is_not_read_from_the_graph(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under activation checkpointing the checkpoint's hooks pack what autograd saves: reading
    the norm's ``X̂`` there would re-run the checkpointed forward, so the rule recomputes it.
    The forward runs as often as with the reading switched off, and the Gramian is exact."""
    from jdoptim.autogram._records import saved_tensors_packed

    assert not saved_tensors_packed()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert saved_tensors_packed()
    torch.manual_seed(0)
    model, x = _CheckpointedNorm().double(), torch.randn(4, 3, 5, dtype=torch.float64)
    calls, gramian, expected = _checkpointed_step(model, x)
    assert_gramian_close(gramian, expected, rtol=1e-12)
    monkeypatch.setattr(rules.norm.NormAffineRule, "reads_graph", False)
    assert _checkpointed_step(model, x)[0] == calls >= 1


@pytest.mark.parametrize("batch_dim, rows", [(0, 1), (0, 3), (None, 3)])
def test_conv1d_rows_are_contiguous_and_exact(batch_dim: int | None, rows: int) -> None:
    """transformers' ``Conv1D`` (weight ``[in, out]``) forms its rows as ``Xᵀ D``: contiguous
    (copied straight into the held rows) and equal to autograd's gradient of each loss."""
    torch.manual_seed(0)
    layer = _transformers_layer("transformers.pytorch_utils", "Conv1D", 4, 5).double()
    with Engine(layer, batch_dim=batch_dim) as engine:
        out = layer(torch.randn(3, 6, 5, dtype=torch.float64)).sin()
        losses = out[..., :rows].sum(1)  # [3, rows]: rows losses per sample, or 3·rows tasks
        expected = explicit_jacobian(losses, [layer.weight]).reshape(3, rows, 5, 4)
        step = engine.step(losses, [layer.weight], [], per_sample=batch_dim is not None)
        (parts,) = step.rule_parameters
        with torch.no_grad():
            (found,) = parts.rule.jacobians([layer.weight])
    assert found.is_contiguous()
    torch.testing.assert_close(found.reshape(3, rows, 5, 4), expected)


@pytest.mark.parametrize(
    "make_layer, shape", [(nn.BatchNorm2d, (4, 3, 5, 5)), (nn.BatchNorm1d, (6, 3))]
)
def test_a_training_batch_norm_reads_its_batch_statistics(make_layer, shape: tuple) -> None:
    """In training mode a batch norm's kernel saved the batch's ``μ, 1/σ``: ``X̂`` comes from
    them (task losses: the batch is one sample), and the Gramian is exact."""
    from jdoptim.autogram.rules.norm import _normalised, _Statistics

    torch.manual_seed(0)
    layer = make_layer(3).double().train()
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight) * 0.3)
    x = torch.randn(*shape, dtype=torch.float64)
    with Engine(layer) as engine:
        out = layer(x)
        read = rules.registered_rule(layer).read_graph(layer, out.grad_fn)
        assert isinstance(read, _Statistics)
        torch.testing.assert_close(read.normalised(x, layer), _normalised(layer, x))
        losses = torch.stack([out.sin().sum(), (out * out).mean()])
        expected = explicit_gramian(losses, engine.parameters())
        assert_gramian_close(engine.compute_gramian(losses), expected, rtol=1e-12)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding, dilation",
    [
        ((2, 3, 8, 8), (4, 4), None, (0, 0), (1, 1)),  # tiles: a reshape
        ((2, 3, 9, 7), (2, 3), None, (0, 0), (1, 1)),  # tiles, ragged edges dropped
        ((2, 1, 1, 10), (1, 5), None, (0, 0), (1, 1)),  # a Conv1d's height-1 image
        ((2, 3, 8, 8), (3, 3), (2, 2), (1, 1), (1, 1)),  # overlapping: F.unfold itself
        ((2, 3, 8, 8), (2, 2), None, (1, 1), (1, 1)),
        ((2, 3, 8, 8), (2, 2), None, (0, 0), (2, 2)),
    ],
)
def test_patch_columns_equal_unfold(shape, kernel, stride, padding, dilation) -> None:
    """The columns of tiling patches by a reshape are ``F.unfold``'s, bit for bit."""
    from jdoptim.autogram.rules._patches import unfold

    images = torch.randn(*shape)
    step = kernel if stride is None else stride
    expected = torch.nn.functional.unfold(images, kernel, dilation, padding, step)
    assert torch.equal(unfold(images, kernel, dilation, padding, stride), expected)


_FREED_NORMS = {
    "layernorm": lambda: nn.LayerNorm(6),
    "groupnorm": lambda: nn.GroupNorm(2, 6),
    "batchnorm_train": lambda: nn.BatchNorm1d(6),
    "llama_rmsnorm": lambda: _transformers_layer(
        "transformers.models.llama.modeling_llama", "LlamaRMSNorm", 6
    ),
}


@pytest.mark.parametrize("name", list(_FREED_NORMS))
def test_what_a_norm_reads_from_the_graph_does_not_keep_the_graph(name: str) -> None:
    """A saved output comes back with its node as ``grad_fn`` (GroupNorm's statistics do), and
    the record is in that node's metadata: kept as it is, it would make a cycle through C++
    that keeps every step's graph alive. What the rules read is detached: after a step, the
    graph and the tensors it saved are gone."""
    import gc
    import weakref

    linear, norm = nn.Linear(4, 6), _FREED_NORMS[name]()
    per_sample = name != "batchnorm_train"  # (a training batch norm mixes the samples)
    with Engine(linear, norm, batch_dim=0 if per_sample else None) as engine:
        for _ in range(2):
            hidden = linear(torch.randn(5, 4))
            alive = weakref.ref(hidden)
            out = norm(hidden).sin()
            losses = out.sum(1) if per_sample else torch.stack([out.sum(), out.pow(2).sum()])
            engine.compute_gramian(losses)
            del hidden, out, losses
            gc.collect()
            assert alive() is None


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@pytest.mark.parametrize(
    "shape, batch_dim, rows",
    [
        ((4, 3), 0, 1),
        ((4, 6, 3), 0, 1),
        ((4, 6, 3), 0, 2),
        ((4, 6, 3), None, 2),
        ((4, 2, 64), 0, 1),
    ],
)
def test_linear_forms_rows_as_its_factorisation_says(
    layout: str, shape: tuple, batch_dim: int | None, rows: int
) -> None:
    """``LinearLikeRule.forms_rows`` reads the decision from the shapes; it must be what the
    factorisation's kernel term says (the base class's answer), for every subset of weight and
    bias, on both branches of the cost model (one position, few positions, many positions)."""
    torch.manual_seed(0)
    wide = shape[-1] == 64  # (few positions of a wide layer: the kernel contraction)
    width, out = shape[-1], 64 if wide else 2
    if layout == "linear":
        layer: nn.Module = nn.Linear(width, out).double()
    else:
        layer = _transformers_layer("transformers.pytorch_utils", "Conv1D", out, width).double()
    with Engine(layer, batch_dim=batch_dim) as engine:
        out = layer(torch.randn(*shape, dtype=torch.float64)).sin()
        losses = out.reshape(shape[0], -1)[:, :rows]
        params = [layer.weight, layer.bias]
        step = engine.step(losses, params, [], per_sample=batch_dim is not None)
        (parts,) = step.rule_parameters
    rule = parts.rule
    assert isinstance(rule, rules.LinearLikeRule)
    answers = set()
    for subset in ([layer.weight], [layer.bias], params):
        by_terms = rules.LayerRule.forms_rows(rule, subset)
        assert rule.forms_rows(subset) == by_terms
        answers.add(by_terms)
    assert answers == ({True, False} if wide or len(shape) == 2 else {True})


@pytest.mark.parametrize(
    "shape, kernel", [((2, 3, 8, 8), (4, 4)), ((2, 3, 9, 7), (2, 3)), ((2, 1, 1, 10), (1, 5))]
)
def test_patch_rows_equal_transposed_unfold(shape, kernel) -> None:
    """The rows of tiling patches (ViT's projection inputs), contiguous, are ``F.unfold``'s
    columns transposed, bit for bit (ragged edges dropped)."""
    from jdoptim.autogram.rules._patches import patches_last

    images = torch.randn(*shape)
    rows = patches_last(images, kernel)
    assert rows.is_contiguous()
    assert torch.equal(rows, torch.nn.functional.unfold(images, kernel, stride=kernel).mT)
