"""JDOptimizer in the torch.optim ecosystem: optimizers, schedulers, groups, checkpoints."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from tests.models import MultiTaskMLP, task_losses
from tests.oracles import explicit_jacobian, split_like, upgrad_weights

OPTIMIZERS = {
    "sgd_momentum": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda params: torch.optim.RMSprop(params, lr=1e-3, momentum=0.5),
}


def _hand_made_upgrad_grads(model: MultiTaskMLP, losses):
    """Trunk: UPGrad of the explicit Jacobian (scipy oracle); heads: their own loss gradient."""
    trunk = list(model.trunk.parameters())
    jacobian = explicit_jacobian(losses, trunk)
    weights = upgrad_weights(jacobian.double()).float()
    grads = dict(zip(map(id, trunk), split_like(weights @ jacobian, trunk)))
    for loss, head in zip(losses, model.heads):
        for p, g in zip(
            head.parameters(), torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
        ):
            grads[id(p)] = g
    return grads


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_trajectory_equals_the_wrapped_optimizer_fed_hand_made_updates(name):
    model = MultiTaskMLP()
    twin = copy.deepcopy(model)
    jd = JDOptimizer(OPTIMIZERS[name](model.parameters()), UPGrad())
    reference = OPTIMIZERS[name](twin.parameters())
    for step in range(4):
        x, y = torch.randn(16, 6), torch.randn(16, 3)
        jd.zero_grad()
        jd.step(task_losses(model, x, y))
        reference.zero_grad()
        grads = _hand_made_upgrad_grads(twin, task_losses(twin, x, y))
        for p in twin.parameters():
            p.grad = grads[id(p)]
        reference.step()
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4, msg=f"step {step}")


def test_several_param_groups_keep_their_own_hyperparameters():
    model = MultiTaskMLP(n_tasks=2)
    inner = torch.optim.SGD(
        [{"params": model.trunk.parameters(), "lr": 0.0}, {"params": model.heads.parameters()}],
        lr=0.1,
    )
    trunk_before = copy.deepcopy(model.trunk)
    heads_before = copy.deepcopy(model.heads)
    JDOptimizer(inner).step(task_losses(model, torch.randn(8, 6), torch.randn(8, 2)))
    for p, q in zip(model.trunk.parameters(), trunk_before.parameters()):
        assert torch.equal(p, q)
    assert any(
        not torch.equal(p, q) for p, q in zip(model.heads.parameters(), heads_before.parameters())
    )


SCHEDULERS = {
    "StepLR": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: lr_scheduler.MultiStepLR(o, milestones=[1, 3], gamma=0.3),
    "ExponentialLR": lambda o: lr_scheduler.ExponentialLR(o, gamma=0.9),
    "CosineAnnealingLR": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=5),
    "LambdaLR": lambda o: lr_scheduler.LambdaLR(o, lambda e: 1 / (e + 1)),
    "MultiplicativeLR": lambda o: lr_scheduler.MultiplicativeLR(o, lambda e: 0.8),
    "LinearLR": lambda o: lr_scheduler.LinearLR(o, start_factor=0.2, total_iters=4),
    "ConstantLR": lambda o: lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2),
    "PolynomialLR": lambda o: lr_scheduler.PolynomialLR(o, total_iters=5, power=2.0),
    "CosineAnnealingWarmRestarts": lambda o: lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=2),
    "OneCycleLR": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=10),
    "CyclicLR": lambda o: lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "SequentialLR": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)],
        milestones=[2],
    ),
    "ChainedScheduler": lambda o: lr_scheduler.ChainedScheduler(
        [lr_scheduler.ConstantLR(o, factor=0.5, total_iters=2), lr_scheduler.ExponentialLR(o, 0.9)]
    ),
    "ReduceLROnPlateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_lr_scheduler_drives_the_wrapped_optimizer(name):
    model = MultiTaskMLP(n_tasks=2)
    twin = copy.deepcopy(model)
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    jd_sched, plain_sched = SCHEDULERS[name](jd), SCHEDULERS[name](plain)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    seen_lrs = {jd.param_groups[0]["lr"]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for _ in range(5):
            jd.zero_grad()
            jd.step(task_losses(model, x, y))
            plain.zero_grad()
            sum(task_losses(twin, x, y)).backward()
            plain.step()
            if name == "ReduceLROnPlateau":
                jd_sched.step(1.0)
                plain_sched.step(1.0)
            else:
                jd_sched.step()
                plain_sched.step()
            assert jd.optimizer.param_groups[0]["lr"] == pytest.approx(plain.param_groups[0]["lr"])
            seen_lrs.add(jd.param_groups[0]["lr"])
    assert len(seen_lrs) > 1  # the scheduler really changed the wrapped optimizer's lr


def _run(model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        opt.step(task_losses(model, x, y))


@pytest.mark.parametrize("make_inner", [OPTIMIZERS["adam"], OPTIMIZERS["sgd_momentum"]])
def test_state_dict_round_trip_resumes_the_exact_trajectory(make_inner):
    batches = [(torch.randn(16, 6), torch.randn(16, 3)) for _ in range(6)]
    model = MultiTaskMLP()
    start = copy.deepcopy(model.state_dict())
    uninterrupted = JDOptimizer(make_inner(model.parameters()), UPGrad())
    _run(model, uninterrupted, batches)

    resumed_model = MultiTaskMLP()
    resumed_model.load_state_dict(start)
    first = JDOptimizer(make_inner(resumed_model.parameters()), UPGrad())
    _run(resumed_model, first, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": resumed_model.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    assert "jdoptim" in checkpoint["opt"] and "state" in checkpoint["opt"]

    fresh_model = MultiTaskMLP()
    fresh_model.load_state_dict(checkpoint["model"])
    second = JDOptimizer(make_inner(fresh_model.parameters()), UPGrad())
    second.load_state_dict(checkpoint["opt"])
    _run(fresh_model, second, batches[3:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_a_plain_optimizer_state_dict_loads_too():
    model = nn.Linear(3, 2)
    inner = torch.optim.Adam(model.parameters())
    opt = JDOptimizer(inner)
    opt.load_state_dict(torch.optim.Adam(model.parameters()).state_dict())
    assert opt.state_dict()["param_groups"][0]["lr"] == 1e-3


def _stateful_aggregators():
    from jdoptim.aggregation import GradVac, PCGrad

    return {"gradvac": lambda: GradVac(seed=3), "pcgrad": lambda: PCGrad(seed=5)}


@pytest.mark.parametrize("name", ["gradvac", "pcgrad"])
def test_checkpoint_resumes_stateful_and_randomised_aggregators_exactly(name):
    make_aggregator = _stateful_aggregators()[name]
    batches = [(torch.randn(16, 6), torch.randn(16, 3)) for _ in range(6)]
    model = MultiTaskMLP()
    start = copy.deepcopy(model.state_dict())
    uninterrupted = JDOptimizer(OPTIMIZERS["adam"](model.parameters()), make_aggregator())
    _run(model, uninterrupted, batches)

    first_model = MultiTaskMLP()
    first_model.load_state_dict(start)
    first = JDOptimizer(OPTIMIZERS["adam"](first_model.parameters()), make_aggregator())
    _run(first_model, first, batches[:3])
    buffer = io.BytesIO()
    torch.save({"model": first_model.state_dict(), "opt": first.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)

    fresh_model = MultiTaskMLP()
    fresh_model.load_state_dict(checkpoint["model"])
    # A fresh aggregator (EMA and generator as at construction): only the checkpoint's
    # aggregator state can make the two trajectories agree.
    second = JDOptimizer(OPTIMIZERS["adam"](fresh_model.parameters()), make_aggregator())
    second.load_state_dict(checkpoint["opt"])
    _run(fresh_model, second, batches[3:])
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, atol=0, rtol=0)


def test_an_aggregator_that_needs_the_whole_jacobian_gets_it():
    from jdoptim.aggregation import TrimmedMean

    model = MultiTaskMLP(n_tasks=5)
    trunk = list(model.trunk.parameters())
    losses = task_losses(model, torch.randn(16, 6), torch.randn(16, 5))
    jacobian = explicit_jacobian(losses, trunk)
    # Coordinate-wise trimmed mean, by hand: drop the largest and smallest value per column.
    expected = jacobian.sort(dim=0).values[1:-1].mean(dim=0)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), TrimmedMean(trim_number=1))
    record = opt.step(losses)
    assert record.weights is None
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in trunk]), expected)
