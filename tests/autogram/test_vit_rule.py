"""The rule for transformers' ``ViTEmbeddings`` (``jdoptim.autogram.rules.vit``): Gramian and
update against the explicit Jacobian of the same losses and against the generic rule, in every
loss layout; the calls it does not take (dropout active, masked positions, interpolated position
encoding) go through the generic rule, still exact."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine, rules
from jdoptim.autogram._certify import EngineRouteWarning

from ._same_losses import check_gramian, check_step, trainable

transformers = pytest.importorskip("transformers")

_LAYOUTS = {"per-sample": 0, "tasks": None, "batch x tasks": 0}


def _vit(dropout: float = 0.0, mask_token: bool = False) -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=3,
        hidden_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
    )
    model = transformers.ViTModel(config, add_pooling_layer=False, use_mask_token=mask_token)
    with torch.no_grad():  # transformers initialises the class token and position embedding small
        model.embeddings.cls_token.normal_()
        model.embeddings.position_embeddings.normal_()
    return model.double().train()


def _losses(model: nn.Module, layout: str, **forward: object) -> Callable[[], Tensor]:
    images = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    # (linear in the normalised hidden states: a mean of their squares would be nearly constant
    # after the final LayerNorm, leaving the embeddings' gradients at rounding level)
    u, v = torch.randn(12, dtype=torch.float64), torch.randn(12, dtype=torch.float64)

    def losses() -> Tensor:
        hidden = model(pixel_values=images, **forward).last_hidden_state  # [b, 5, 12]
        pair = torch.stack([(hidden[:, 0] @ u).sin(), (hidden[:, 1:] @ v).tanh().mean(1)], 1)
        if layout == "per-sample":
            return pair[:, 0]
        return pair.mean(0) if layout == "tasks" else pair

    return losses


def _rules_used(monkeypatch: pytest.MonkeyPatch) -> list[rules.LayerRule]:
    used: list[rules.LayerRule] = []
    original = rules.make_rule

    def spy(call: rules.Call) -> rules.LayerRule:
        used.append(original(call))
        return used[-1]

    monkeypatch.setattr("jdoptim.autogram._step.make_rule", spy)
    return used


def _embedding_rules(used: list[rules.LayerRule]) -> set[str]:
    return {
        type(rule).__name__ for rule in used if type(rule.call.module).__name__ == "ViTEmbeddings"
    }


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_rule_is_exact_and_matches_the_generic_rule(
    layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _vit()
    losses = _losses(model, layout)
    batch_dim = _LAYOUTS[layout]
    used = _rules_used(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)  # the rule passes the engine's check
        with_rule = check_gramian(model, losses, batch_dim, rtol=1e-10)
        check_step(model, losses, batch_dim, rtol=1e-9)
    assert _embedding_rules(used) == {"ViTEmbeddingsRule"}
    used.clear()
    monkeypatch.setattr(rules, "registered_rule", lambda module: None)
    monkeypatch.setattr("jdoptim.autogram.engine.registered_rule", lambda module: None)
    with Engine(model, batch_dim=batch_dim) as engine:
        with_fallback = engine.compute_gramian(losses())
    torch.testing.assert_close(with_rule, with_fallback, rtol=1e-10, atol=1e-12)


def test_rule_with_part_of_the_parameters_trained() -> None:
    """A frozen class token and projection bias: the rule differentiates the rest only."""
    model = _vit()
    model.embeddings.cls_token.requires_grad_(False)
    model.embeddings.patch_embeddings.projection.bias.requires_grad_(False)
    for layout, batch_dim in _LAYOUTS.items():
        check_gramian(model, _losses(model, layout), batch_dim, rtol=1e-10)
        check_step(model, _losses(model, layout), batch_dim, rtol=1e-9)
    assert trainable(model)


@pytest.mark.parametrize(
    "case", ["dropout in train mode", "masked positions", "interpolated positions"]
)
def test_calls_the_rule_does_not_take_go_through_the_generic_rule(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    forward: dict[str, object] = {}
    if case == "dropout in train mode":
        model = _vit(dropout=0.3)
    elif case == "masked positions":
        model = _vit(mask_token=True)
        forward["bool_masked_pos"] = torch.tensor([[True, False, True, False]] * 5)
    else:
        model = _vit()
        forward["interpolate_pos_encoding"] = True
    used = _rules_used(monkeypatch)
    for layout, batch_dim in _LAYOUTS.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EngineRouteWarning)
            check_gramian(model, _losses(model, layout, **forward), batch_dim, rtol=1e-9)
            check_step(model, _losses(model, layout, **forward), batch_dim, rtol=1e-8)
    assert _embedding_rules(used) == {"GenericRule"}


def test_eval_mode_dropout_takes_the_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _vit(dropout=0.3).eval()
    used = _rules_used(monkeypatch)
    check_gramian(model, _losses(model, "per-sample"), 0, rtol=1e-10)
    assert _embedding_rules(used) == {"ViTEmbeddingsRule"}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_rows_are_the_explicit_jacobian(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule's rows (used where a parameter is tied into another call) against the explicit
    Jacobian of the same losses, parameter by parameter."""
    from ._oracle import explicit_jacobian

    model = _vit()
    used = _rules_used(monkeypatch)
    batch_dim = _LAYOUTS[layout]
    params = list(model.embeddings.parameters())
    with Engine(model, batch_dim=batch_dim) as engine:
        losses = _losses(model, layout)()
        expected = explicit_jacobian(losses, params)  # [N, P], N in the losses' row-major order
        engine.step(losses, trainable(model), [], per_sample=batch_dim is not None)
    (rule,) = [r for r in used if type(r).__name__ == "ViTEmbeddingsRule"]
    with torch.no_grad():
        rows = rule.jacobians(params)  # each [b, T, *p.shape]
    actual = torch.cat([r.reshape(r.shape[0] * r.shape[1], -1) for r in rows], dim=1)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
