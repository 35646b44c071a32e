"""The engine's Gramian equals the Gramian of an explicit Jacobian on real architectures."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine
from tests.models import FreeParam

from ._oracle import as_square, assert_gramian_close, explicit_gramian

# Every case here must be exact on the engine's fast path: a slower fallback route (which would
# also be exact) must not hide a wrong rule.
pytestmark = pytest.mark.filterwarnings("error::jdoptim.autogram.EngineRouteWarning")


def check(model: nn.Module, forward: Callable[[], Tensor], batch_dim: int | None) -> None:
    """Compare the engine with the oracle on the losses ``forward()`` returns."""
    with Engine(model, batch_dim=batch_dim) as engine:
        losses = forward()
        expected = explicit_gramian(losses, engine.parameters())
        gramian = engine.compute_gramian(losses)
    assert gramian.shape == tuple(losses.shape) + tuple(reversed(losses.shape))
    actual = gramian.reshape(1, 1) if losses.dim() == 0 else as_square(gramian, losses.shape)
    assert_gramian_close(actual, expected)


# Each case: (model factory, forward(model) -> per-sample output [b, ...] of the batch)
def _freeparam():
    model = FreeParam()
    x = torch.randn(4, 15)
    return model, lambda: model(x)


def _mha():
    model = nn.MultiheadAttention(8, 2, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 8)
    return model, lambda: model(x, x, x, need_weights=False)[0]


def _transformer():
    model = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    x = torch.randn(3, 5, 8)
    return model, lambda: model(x)


class _CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 5, 3, stride=2)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(torch.relu(self.norm(self.conv1(x))))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def _cnn():
    model = _CNN()
    x = torch.randn(3, 3, 10, 10)
    return model, lambda: model(x)


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 11, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens))))


def _tied():
    model = _Tied()
    tokens = torch.randint(0, 11, (3, 4))
    tokens[0, 0] = 0
    return model, lambda: model(tokens)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.last = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.shared(torch.tanh(self.shared(x))))


def _twice():
    model = _Twice()
    x = torch.randn(4, 5)
    return model, lambda: model(x)


class _AliasedParameter(nn.Module):
    """A layer without children holding one parameter under two names (used through both)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 5) * 0.5)
        self.alias = self.weight
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight.T + self.bias) @ self.alias


def _aliased():
    model = nn.Sequential(_AliasedParameter(), nn.Linear(5, 2))
    x = torch.randn(4, 5)
    return model, lambda: model(x)


class _KwargsDict(nn.Module):
    """Direct parameters, a keyword argument, a dict of a tensor and a tuple as output."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5))
        self.proj = nn.Linear(5, 3)

    def forward(self, x: Tensor, *, shift: Tensor, flag: bool = True) -> dict:
        h = torch.tanh(x * self.scale + shift)
        return {"main": self.proj(h), "aux": (h.sum(-1, keepdim=True), "text")}


class _UsesKwargsDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _KwargsDict()
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x, shift=torch.ones(5), flag=False)
        return self.head(torch.cat([out["main"], out["aux"][0]], dim=-1))


def _kwargs():
    model = _UsesKwargsDict()
    x = torch.randn(4, 5)
    return model, lambda: model(x)


def _frozen():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    x = torch.randn(4, 5)
    return model, lambda: model(x)


class _Recurrent(nn.Module):
    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


class _HiddenState(nn.Module):
    """Uses the final hidden state (samples on dim 1 of h_n) and an explicit h_0."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.tanh(x[:, 0, :1]).expand(-1, 5).unsqueeze(0).expand(2, -1, -1).contiguous()
        state = h0 if isinstance(self.rnn, nn.GRU) else (h0, h0 * 0.5)
        out, final = self.rnn(x, state)
        last = final[0] if isinstance(final, tuple) else final
        return self.head(out[:, -1]) + self.head(last[-1])


def _gru_hidden():
    model = _HiddenState(nn.GRU)
    x = torch.randn(3, 4, 4)
    return model, lambda: model(x)


def _lstm_hidden():
    model = _HiddenState(nn.LSTM)
    x = torch.randn(3, 4, 4)
    return model, lambda: model(x)


def _gru():
    model = _Recurrent(nn.GRU)
    x = torch.randn(3, 4, 4)
    return model, lambda: model(x)


def _lstm():
    model = _Recurrent(nn.LSTM)
    x = torch.randn(3, 4, 4)
    return model, lambda: model(x)


def _seq_linear():
    model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.LayerNorm(7), nn.Linear(7, 3))
    x = torch.randn(3, 5, 6)
    return model, lambda: model(x).mean(1)


def _batchnorm():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4), nn.ReLU(), nn.Flatten())
    x = torch.randn(4, 2, 6)
    return model, lambda: model(x)


CASES = {
    "freeparam": _freeparam,
    "mha": _mha,
    "transformer": _transformer,
    "cnn": _cnn,
    "tied_embedding": _tied,
    "called_twice": _twice,
    "aliased_parameter": _aliased,
    "kwargs_dict": _kwargs,
    "frozen": _frozen,
    "gru": _gru,
    "lstm": _lstm,
    "gru_hidden": _gru_hidden,
    "lstm_hidden": _lstm_hidden,
    "seq_linear_layernorm": _seq_linear,
}
PER_SAMPLE = ["freeparam", "mha", "transformer", "cnn", "tied_embedding", "called_twice"]
PER_SAMPLE += [
    "aliased_parameter",
    "kwargs_dict",
    "frozen",
    "seq_linear_layernorm",
    "gru",
    "gru_hidden",
    "lstm_hidden",
]


def _reduce(out: Tensor) -> Tensor:
    """Per-sample losses ``[b]`` from a per-sample output ``[b, ...]``."""
    return out.pow(2).reshape(out.shape[0], -1).sum(1)


@pytest.mark.parametrize("name", list(CASES))
def test_task_losses(name: str) -> None:
    """No batch_dim: the losses are ``m`` task losses (here one per output column, batch mean)."""
    model, forward = CASES[name]()
    check(model, lambda: forward().pow(2).reshape(forward_shape(forward), -1).mean(0), None)


def forward_shape(forward: Callable[[], Tensor]) -> int:
    with torch.no_grad():
        return forward().shape[0]


@pytest.mark.parametrize("name", PER_SAMPLE)
def test_per_sample_losses(name: str) -> None:
    model, forward = CASES[name]()
    check(model, lambda: _reduce(forward()), 0)


@pytest.mark.parametrize("name", ["freeparam", "cnn", "tied_embedding", "seq_linear_layernorm"])
def test_per_sample_task_matrix(name: str) -> None:
    """``[batch, tasks]`` losses with batch_dim=0: the generalized Gramian."""
    model, forward = CASES[name]()
    check(model, lambda: forward().reshape(forward_shape(forward), -1)[:, :3].pow(2), 0)


@pytest.mark.parametrize("name", ["cnn", "gru"])
def test_scalar_output(name: str) -> None:
    model, forward = CASES[name]()
    check(model, lambda: forward().pow(2).sum(), None)


def test_batch_dim_one() -> None:
    """Samples along dimension 1 of every tensor (a ``[tasks, batch]`` loss matrix)."""
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(2, 4, 5)  # [extra, batch, features]: batch on dim 1
    check(model, lambda: model(x).pow(2).sum(-1), 1)


def test_batchnorm_training_without_batch_dim() -> None:
    model, forward = _batchnorm()
    check(model, lambda: forward().pow(2).mean(0)[:4], None)
    assert model[1].num_batches_tracked.item() == 1  # one forward: the engine never re-ran it


def test_batchnorm_eval_per_sample() -> None:
    model, forward = _batchnorm()
    model.eval()
    model[1].running_mean.uniform_()
    check(model, lambda: _reduce(forward()), 0)


def _step_grads(model: nn.Module, losses: Callable[[], Tensor], **options) -> list[Tensor]:
    """``.grad`` after one ``JDOptimizer`` step (SGD with lr 0: the model does not change)."""
    model.zero_grad(set_to_none=True)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), **options)
    opt.step(losses())
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    if "modules" in options:
        opt._update_computer.engine.close()  # type: ignore[attr-defined]
    return grads


@pytest.mark.parametrize("name", list(CASES))
def test_optimizer_step_matches_jacobian_path(name: str) -> None:
    """``JDOptimizer(modules=model)`` runs the rules inside its step (under ``no_grad``, with the
    weighted update as well as the Gramian): on every case, its ``.grad`` equals the
    explicit-Jacobian path's, for task losses and, where the model allows, per-sample losses."""
    model, forward = CASES[name]()
    params = [p for p in model.parameters() if p.requires_grad]

    def task_losses() -> Tensor:
        out = forward()
        return out.pow(2).reshape(out.shape[0], -1).mean(0)[:4]

    cases = [(task_losses, {"scope": "all"}, {"scope": "all", "modules": model})]
    if name in PER_SAMPLE:
        cases.append((lambda: _reduce(forward()), {}, {"modules": model, "batch_dim": 0}))
    for losses, explicit, engine in cases:
        expected = _step_grads(model, losses, **explicit)
        actual = _step_grads(model, losses, **engine)
        assert len(actual) == len(expected) == len(params)
        for a, e in zip(actual, expected):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-6)
