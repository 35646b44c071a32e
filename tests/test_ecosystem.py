"""JDOptimizer inside the usual torch tooling: clipping, LR schedulers, checkpoints, compile."""

from __future__ import annotations

import copy
import io
import shutil
import warnings

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import GradVac, Mean, NashMTL, PCGrad, UPGrad


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _losses(model, x, y):
    out = model(x)
    return [(out[:, 0] - y).pow(2).mean(), (out[:, 1] + y).pow(2).mean(), out[:, 2].abs().mean()]


def _mean_gradient(model, x, y) -> list[torch.Tensor]:
    """The Mean aggregator's update by hand: the mean of the per-loss gradients."""
    params = list(model.parameters())
    grads = [torch.autograd.grad(loss, params, retain_graph=True) for loss in _losses(model, x, y)]
    return [torch.stack(per_param).mean(dim=0) for per_param in zip(*grads)]


# -- gradient clipping between aggregation and update ------------------------------------------


def test_clipping_with_a_step_pre_hook_on_the_wrapped_optimizer():
    model = _model()
    twin = copy.deepcopy(model)
    x, y = torch.randn(32, 4), 5 * torch.randn(32)

    # By hand: the aggregated update, clipped by torch, then an SGD step.
    for p, g in zip(twin.parameters(), _mean_gradient(twin, x, y)):
        p.grad = g.clone()
    total = torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm=0.5)
    assert total > 0.5  # the clipping is active
    with torch.no_grad():
        for p in twin.parameters():
            p -= 0.1 * p.grad

    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), scope="all")
    norms = []
    opt.optimizer.register_step_pre_hook(
        lambda optimizer, args, kwargs: norms.append(
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        )
    )
    opt.step(_losses(model, x, y))
    torch.testing.assert_close(norms[0], total)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


# -- learning-rate schedulers ----------------------------------------------------------------


def test_lr_scheduler_drives_the_wrapped_optimizer_without_warnings():
    model = _model()
    x, y = torch.randn(32, 4), torch.randn(32)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), scope="all")
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(5):
            lr = opt.optimizer.param_groups[0]["lr"]
            assert lr == pytest.approx(0.1 * 0.5 ** (step // 2))
            before = [p.detach().clone() for p in model.parameters()]
            update = _mean_gradient(model, x, y)
            opt.zero_grad()
            opt.step(_losses(model, x, y))
            scheduler.step()
            for p, b, g in zip(model.parameters(), before, update):
                torch.testing.assert_close(p.detach(), b - lr * g)


def test_reduce_lr_on_plateau():
    model = _model()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.1)
    scheduler.step(1.0)
    scheduler.step(2.0)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


# -- checkpointing -------------------------------------------------------------------------------


def _run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        opt.step(_losses(model, x, y))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "make_aggregator",
    [
        lambda: GradVac(beta=0.5, seed=3),  # EMA state and a random order
        lambda: PCGrad(seed=3),  # a random order
        lambda: NashMTL(update_weights_every=2),  # cached weights
        lambda: UPGrad(),
    ],
    ids=["GradVac", "PCGrad", "NashMTL", "UPGrad"],
)
def test_resuming_from_a_checkpoint_continues_the_same_trajectory(make_aggregator):
    torch.manual_seed(0)
    batches = [(torch.randn(16, 4), torch.randn(16)) for _ in range(6)]
    model = _model()
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), make_aggregator())
    _run(model, opt, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    straight = _run(model, opt, batches[3:])

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    resumed_model = _model()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt = JDOptimizer(
        torch.optim.Adam(resumed_model.parameters(), lr=0.05), make_aggregator()
    )
    resumed_opt.load_state_dict(checkpoint["opt"])
    resumed = _run(resumed_model, resumed_opt, batches[3:])
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b)


def test_without_the_aggregator_state_a_stateful_trajectory_differs():
    # The resuming test above can fail: GradVac's state matters to the trajectory.
    torch.manual_seed(0)
    batches = [(torch.randn(16, 4), torch.randn(16)) for _ in range(6)]
    model = _model()
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), GradVac(beta=0.5, seed=3))
    _run(model, opt, batches[:3])
    model_state, adam_state = copy.deepcopy(model.state_dict()), opt.optimizer.state_dict()
    straight = _run(model, opt, batches[3:])

    other = _model()
    other.load_state_dict(model_state)
    fresh = JDOptimizer(torch.optim.Adam(other.parameters(), lr=0.05), GradVac(beta=0.5, seed=3))
    fresh.optimizer.load_state_dict(adam_state)  # Adam restored, the aggregator not
    resumed = _run(other, fresh, batches[3:])
    assert any(not torch.equal(a, b) for a, b in zip(straight, resumed))


def test_state_dict_holds_the_aggregator_state():
    model = _model()
    opt = JDOptimizer(torch.optim.Adam(model.parameters()), GradVac(seed=1))
    x, y = torch.randn(16, 4), torch.randn(16)
    opt.step(_losses(model, x, y))
    state = opt.state_dict()
    assert "jdoptim" in state and state["jdoptim"]["aggregator"]
    assert set(state) - {"jdoptim"} == set(opt.optimizer.state_dict())


# -- torch.compile ---------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    """A clean compile cache, and AOTAutograd's buffer donation off (restored afterwards)."""
    import torch._functorch.config as functorch_config

    torch._dynamo.reset()
    with functorch_config.patch(donated_buffer=False):
        yield
    torch._dynamo.reset()


_NO_COMPILER = pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("c++") is None,
    reason="inductor on CPU needs a C++ compiler",
)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=_NO_COMPILER)])
def test_compiled_model_on_the_jacobian_path(backend, fresh_dynamo):
    # With inductor, vmap has no batching rule for the compiled backward's out= kernels: the
    # Jacobian falls back to one backward per loss, and the result is the same.
    model = _model()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    x, y = torch.randn(32, 4), torch.randn(32)
    expected = [p.detach() - 0.1 * g for p, g in zip(twin.parameters(), _mean_gradient(twin, x, y))]

    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), scope="all")
    opt.step(_losses(compiled, x, y))
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)


@pytest.mark.slow
def test_compiled_model_with_the_gramian_engine(fresh_dynamo):
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    x, y = torch.randn(32, 4), torch.randn(32)
    params = list(model.parameters())
    jacobian = torch.stack(
        [
            torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
            for loss in _losses(model, x, y)
        ]
    )
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(), modules=model)
    record = opt.step(_losses(compiled, x, y))
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T)


@pytest.mark.slow
def test_recompiled_model_with_a_new_batch_size(fresh_dynamo):
    # A recompilation for a new batch size (dynamic shapes) donates the backward's buffers, which
    # forbids the retain_graph=True of a JDOptimizer's first step (and of the one-backward-per-loss
    # fallback) unless donation is off (README, "torch.compile"). With donation on, this fails.
    model = _model()
    compiled = torch.compile(model, backend="aot_eager")
    for batch in (32, 16, 8):
        twin = copy.deepcopy(model)
        x, y = torch.randn(batch, 4), torch.randn(batch)
        expected = [
            p.detach() - 0.1 * g for p, g in zip(twin.parameters(), _mean_gradient(twin, x, y))
        ]
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), scope="all")
        opt.zero_grad()
        opt.step(_losses(compiled, x, y))
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach(), e)


@pytest.mark.slow
def test_compiled_deep_model_per_sample_is_exact_and_compiles_the_hooks_once(fresh_dynamo, caplog):
    # The engine's hooks read autograd nodes and generator states: under torch.compile they run
    # eagerly, as graph breaks. Traced instead, dynamo guards each on the module it is
    # registered on and recompiles it per module until its recompile limit (8), which it
    # reports as a warning; 12 hooked layers pass that limit.
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(6, 6), nn.Tanh()]
    model = nn.Sequential(*layers, nn.Linear(6, 2)).double()
    compiled = torch.compile(model, backend="aot_eager")
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=0)
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        for _ in range(2):
            x = torch.randn(5, 6, dtype=torch.float64)
            losses = compiled(x).pow(2).sum(1)
            rows = [torch.autograd.grad(loss, params, retain_graph=True) for loss in losses]
            jacobian = torch.stack([torch.cat([g.reshape(-1) for g in row]) for row in rows])
            opt.zero_grad()
            record = opt.step(losses)
            torch.testing.assert_close(record.gramian, jacobian @ jacobian.T)
    assert not [r for r in caplog.records if "recompile" in r.getMessage()]
