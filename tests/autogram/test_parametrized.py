"""Layers whose ``weight`` is computed from other parameters in the forward, and forwards that
change their module's buffers.

``torch.nn.utils.parametrizations.weight_norm`` (and the older ``torch.nn.utils.weight_norm``,
which wav2vec2 and HuBERT use on their convolutional position embedding) make a layer's
``weight`` a function of ``weight_g``/``weight_v`` (or ``parametrizations.weight.original0/1``);
a parametrization registered by hand does the same. The differentiated parameters are then not
the module's ``weight``: the layer rules written for ``weight`` must not take such calls (they
used to crash with a reshape error on a weight-normed convolution), and the generic rule, which
re-runs the forward with its parametrization, gives their rows.

Each model is checked against the explicit Jacobian of the same losses, in the per-sample,
``[batch, tasks]`` and task-loss layouts.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram._records import _watched_buffers
from jdoptim.autogram.rules import GenericRule

from ._same_losses import check_gramian, check_step


class _Exp(nn.Module):
    """A hand-written parametrization: the weight is ``exp`` of the stored tensor."""

    def forward(self, stored: Tensor) -> Tensor:
        return stored.exp()


def _weight_norm_conv(legacy: bool) -> nn.Module:
    conv = nn.Conv1d(3, 4, 3, padding=1)
    if legacy:
        with pytest.warns(FutureWarning):
            return nn.utils.weight_norm(conv)
    return nn.utils.parametrizations.weight_norm(conv)


class _Model(nn.Module):
    """Embedding → (weight-normed) Conv1d → parametrized LayerNorm → weight-normed Linear."""

    def __init__(self, legacy: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        parametrize.register_parametrization(self.embed, "weight", _Exp())
        self.conv = _weight_norm_conv(legacy)
        self.norm = nn.LayerNorm(4)
        parametrize.register_parametrization(self.norm, "weight", _Exp())
        self.head = nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens).transpose(1, 2)  # [b, 3, s]
        h = torch.tanh(self.conv(h)).transpose(1, 2)  # [b, s, 4]
        return self.head(self.norm(h).mean(1))  # [b, 2]


def _losses_of(model: nn.Module, pick: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
    tokens = torch.randint(0, 10, (4, 5))

    def losses() -> Tensor:
        out = model(tokens)
        return pick(torch.stack([out[:, 0].pow(2), out.sin().sum(1)], dim=1))

    return losses


LAYOUTS: dict[str, tuple[Callable[[Tensor], Tensor], int | None]] = {
    "per_sample": (lambda losses: losses[:, 0], 0),
    "batch_tasks": (lambda losses: losses, 0),
    "tasks": (lambda losses: losses.mean(0), None),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "legacy_weight_norm"])
def test_parametrized_layers_exact(legacy: bool, layout: str) -> None:
    torch.manual_seed(0)
    model = _Model(legacy).double()
    pick, batch_dim = LAYOUTS[layout]
    check_gramian(model, _losses_of(model, pick), batch_dim, rtol=1e-9)
    check_step(model, _losses_of(model, pick), batch_dim, rtol=1e-9)


def test_parametrized_layers_take_the_generic_rule() -> None:
    """Every parametrized layer's call takes the generic rule (the re-run); none takes the rule
    written for its class's own ``weight``."""
    torch.manual_seed(0)
    model = _Model(legacy=False).double()
    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        losses = _losses_of(model, lambda losses: losses[:, 0])()
        step = engine.step(losses, params, [], per_sample=True)
        generic = {
            type(parts.rule.call.module).__name__
            for parts in step.rule_parameters
            if isinstance(parts.rule, GenericRule)
        }
    assert generic == {
        "ParametrizedEmbedding",
        "ParametrizedConv1d",
        "ParametrizedLayerNorm",
        "ParametrizedLinear",
    }


# -- state changed in the forward -------------------------------------------------------------


class _SpectralHead(nn.Module):
    """``spectral_norm``: each training forward runs a power-iteration step that updates the
    buffers ``_u``, ``_v`` in place and then uses them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.utils.parametrizations.spectral_norm(nn.Linear(5, 6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.lin(x)))


class _DriftingScale(nn.Module):
    """A forward that changes a buffer it reads by a relative ``1e-9``: a re-run after the call
    computes a function off by that much, below the engine's check's tolerance."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 2))
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: Tensor) -> Tensor:
        self.scale.mul_(1.0 + 1e-9)
        return torch.tanh(x @ self.weight) * self.scale


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("make", [_SpectralHead, _DriftingScale], ids=["spectral", "drift"])
def test_forward_that_changes_its_buffers_is_not_re_run(
    make: Callable[[], nn.Module], layout: str
) -> None:
    """The call changed buffers it reads, so a re-run would differentiate another function (by
    1e-10 relative for ``spectral_norm``, which the check's tolerance cannot see): the engine
    does not re-run it, warns naming the module and the buffers, and takes the module's rows
    from autograd. Exact to rounding, on the first step and after."""
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(4, 5, dtype=torch.float64)
    pick, batch_dim = LAYOUTS[layout]

    def losses() -> Tensor:
        out = model(x)
        return pick(torch.stack([out[:, 0].pow(2), out.sin().sum(1)], dim=1))

    buffers = "_u" if make is _SpectralHead else "scale"
    with pytest.warns(EngineRouteWarning, match=f"changed its buffers .*{buffers}"):
        check_gramian(model, losses, batch_dim, rtol=1e-13)
    with pytest.warns(EngineRouteWarning):
        check_step(model, losses, batch_dim, rtol=1e-13)


class _BlockWithBatchNorm(nn.Module):
    """A rule-less block (a direct parameter) holding a ``BatchNorm1d`` in training mode: its
    running statistics change at every forward but the forward does not read them."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(6) + 0.5)
        self.lin = nn.Linear(5, 6)
        self.norm = nn.BatchNorm1d(6)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.norm(self.lin(x))) * self.gain


def test_batch_norm_statistics_are_not_watched() -> None:
    """Training-mode batch-norm running statistics change at every forward, which does not read
    them: they do not count as a change of state (in evaluation mode the forward reads them, and
    they do)."""
    block = _BlockWithBatchNorm()
    assert [name for name, _, _ in _watched_buffers(block.train())] == []
    assert [name for name, _, _ in _watched_buffers(block.eval())] == [
        "norm.running_mean",
        "norm.running_var",
        "norm.num_batches_tracked",
    ]


def test_batch_norm_in_a_re_run_block_is_re_run() -> None:
    """Task losses through a rule-less block holding a training-mode ``BatchNorm1d``: re-run
    by the generic rule (its running statistics frozen for the re-run, where ``torch.func``
    refused their in-place update and the block's rows came from autograd), exact, no route
    warning; the running statistics move once per user forward."""
    torch.manual_seed(0)
    model = _BlockWithBatchNorm().double()
    x = torch.randn(4, 5, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(x)
        return torch.stack([out[:, 0].pow(2).mean(), out.sin().mean()])

    with warnings.catch_warnings():
        warnings.simplefilter("error", EngineRouteWarning)
        check_gramian(model, losses, None, rtol=1e-12)
        check_step(model, losses, None, rtol=1e-12)
    assert model.norm.num_batches_tracked.item() == 2  # the two user forwards only
    assert model.norm.track_running_stats
