"""JDOptimizer against hand-built updates from explicit Jacobians."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer, StepRecord
from jdoptim.aggregation import Mean, Sum, UPGrad
from tests.models import MultiTaskMLP, task_losses
from tests.oracles import explicit_jacobian, split_like, upgrad_weights


def _data(n_tasks: int = 3, batch: int = 16):
    return torch.randn(batch, 6), torch.randn(batch, n_tasks)


def _trunk_and_heads(model: MultiTaskMLP):
    return list(model.trunk.parameters()), [list(h.parameters()) for h in model.heads]


def test_is_a_torch_optimizer_delegating_its_state():
    model = MultiTaskMLP()
    inner = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt = JDOptimizer(inner, UPGrad())
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults is inner.defaults
    extra = nn.Parameter(torch.zeros(2))
    opt.add_param_group({"params": [extra], "lr": 0.5})
    assert inner.param_groups[-1]["params"] == [extra]
    assert "UPGrad" in repr(opt)


@pytest.mark.parametrize("n_tasks", [2, 3, 5])
def test_update_equals_upgrad_built_by_hand_from_the_explicit_jacobian(n_tasks):
    model = MultiTaskMLP(n_tasks=n_tasks)
    x, y = _data(n_tasks)
    trunk, heads = _trunk_and_heads(model)
    before = copy.deepcopy(model)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), UPGrad())

    losses = task_losses(model, x, y)
    jacobian = explicit_jacobian(losses, trunk)
    weights = upgrad_weights(jacobian.double()).float()
    expected_trunk = split_like(weights @ jacobian, trunk)
    expected_heads = [
        torch.autograd.grad(loss, head, retain_graph=True) for loss, head in zip(losses, heads)
    ]
    record = opt.step(losses)

    torch.testing.assert_close(record.weights, weights, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T, atol=1e-5, rtol=1e-4)
    old_trunk, old_heads = _trunk_and_heads(before)
    for p, old, g in zip(trunk, old_trunk, expected_trunk):
        torch.testing.assert_close(p.detach(), old - g, atol=1e-5, rtol=1e-4)
    for head, old_head, grads in zip(heads, old_heads, expected_heads):
        for p, old, g in zip(head, old_head, grads):
            torch.testing.assert_close(p.detach(), old - g, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("modules", [False, True])
@pytest.mark.parametrize("split", ["list", "unbind"])
def test_losses_split_from_one_tensor_are_separate_losses(split, modules):
    """``list(vector)`` and ``torch.unbind``: the losses are outputs of one graph node; each is
    still its own loss, on the Jacobian path and in the engine. (Every head is reached by every
    loss through the stack, so every parameter is shared: the update is UPGrad's on the explicit
    Jacobian over all of them, zeros included.)"""
    model = MultiTaskMLP(n_tasks=3)
    x, y = _data(3)
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=1.0), UPGrad(), modules=model if modules else None)
    vector = torch.stack(task_losses(model, x, y))
    losses = list(vector) if split == "list" else list(torch.unbind(vector))
    jacobian = explicit_jacobian(losses, params)
    weights = upgrad_weights(jacobian.double()).float()
    record = opt.step(losses)
    assert len(record.shared) == len(params)
    torch.testing.assert_close(record.weights, weights, atol=1e-5, rtol=1e-4)
    for p, g in zip(params, split_like(weights @ jacobian, params)):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_upgrad_update_does_not_conflict_with_any_loss():
    # Two tasks pulling the same output in opposite directions: the mean gradient conflicts.
    model = nn.Linear(4, 1)
    x = torch.randn(32, 4)
    out = model(x).squeeze(-1)
    losses = [(out - 1).pow(2).mean(), (out + 1).pow(2).mean() * 3]
    params = list(model.parameters())
    jacobian = explicit_jacobian(losses, params)
    opt = JDOptimizer(torch.optim.SGD(params, lr=1.0), UPGrad())
    opt.step(losses)
    update = torch.cat([p.grad.reshape(-1) for p in params])
    assert (jacobian @ update >= -1e-5).all()


def test_mean_over_all_parameters_with_sgd_is_plain_sgd_on_the_mean_loss():
    model = MultiTaskMLP()
    reference = copy.deepcopy(model)
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), Mean(), scope="all")
    plain = torch.optim.SGD(reference.parameters(), lr=0.05)
    for _ in range(5):
        x, y = _data()
        jd.zero_grad()
        jd.step(task_losses(model, x, y))
        plain.zero_grad()
        torch.stack(task_losses(reference, x, y)).mean().backward()
        plain.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_specific_parameters_get_their_own_loss_gradient_and_all_scope_aggregates_them():
    model = MultiTaskMLP(n_tasks=2)
    x, y = _data(2)
    params = list(model.parameters())
    losses = task_losses(model, x, y)
    jacobian = explicit_jacobian(losses, params)
    opt = JDOptimizer(torch.optim.SGD(params, lr=1.0), Sum(), scope="all")
    record = opt.step(losses)
    # With Sum over all parameters, every gradient is the summed-loss gradient.
    torch.testing.assert_close(torch.cat([p.grad.reshape(-1) for p in params]), jacobian.sum(0))
    assert len(record.shared) == len(params) and not record.specific


def test_foreign_and_unreached_parameters_are_left_alone_gan_style():
    generator, discriminator = nn.Linear(3, 5), nn.Linear(5, 1)
    unused = nn.Parameter(torch.ones(4))
    sentinel = torch.full_like(discriminator.weight, 7.0)
    discriminator.weight.grad = sentinel.clone()
    opt = JDOptimizer(
        torch.optim.SGD([*generator.parameters(), unused], lr=0.1), UPGrad(), freeze_foreign=True
    )
    d_before = copy.deepcopy(discriminator)
    fake = generator(torch.randn(8, 3))
    score = discriminator(fake).squeeze(-1)
    losses = [-score.mean(), fake.pow(2).mean()]
    record = opt.step(losses)
    assert discriminator.weight.grad is not None
    torch.testing.assert_close(discriminator.weight.grad, sentinel)
    assert discriminator.bias.grad is None
    torch.testing.assert_close(discriminator.weight, d_before.weight)
    assert unused.grad is None and torch.equal(unused, torch.ones(4))
    assert {id(p) for p in record.foreign} == {id(discriminator.weight), id(discriminator.bias)}
    assert [id(p) for p in record.unreached] == [id(unused)]
    # freeze_foreign: the discriminator no longer requires grad after the step.
    assert not discriminator.weight.requires_grad and not discriminator.bias.requires_grad
    assert generator.weight.grad is not None


def test_grads_accumulate_like_backward():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    x = torch.randn(5, 3)
    out = model(x)
    losses = [out[:, 0].pow(2).mean(), out[:, 1].abs().mean()]
    expected = explicit_jacobian(losses, params)
    previous = [torch.randn_like(p) for p in params]
    for p, g in zip(params, previous):
        p.grad = g.clone()
    JDOptimizer(torch.optim.SGD(params, lr=0.0), Sum(), scope="all").step(losses)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, torch.cat([g.reshape(-1) for g in previous]) + expected.sum(0))


def test_per_sample_loss_vector_treats_every_parameter_as_shared():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    params = list(model.parameters())
    x, y = torch.randn(6, 4), torch.randn(6)
    per_sample = (model(x).squeeze(-1) - y).pow(2)
    jacobian = explicit_jacobian(list(per_sample), params)
    weights = upgrad_weights(jacobian.double()).float()
    opt = JDOptimizer(torch.optim.SGD(params, lr=1.0), UPGrad())
    record = opt.step(per_sample)
    assert len(record.shared) == len(params)
    torch.testing.assert_close(record.weights, weights, atol=1e-5, rtol=1e-4)
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, weights @ jacobian, atol=1e-5, rtol=1e-4)


def test_mapping_names_appear_in_the_record_and_the_record_is_kept():
    model = MultiTaskMLP(n_tasks=2)
    x, y = _data(2)
    l1, l2 = task_losses(model, x, y)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    record = opt.step({"depth": l1, "segmentation": l2})
    assert isinstance(record, StepRecord) and opt.last_record is record
    assert record.names == ("depth", "segmentation")
    assert set(record.weights_by_name) == {"depth", "segmentation"}
    torch.testing.assert_close(record.losses, torch.stack([l1, l2]).detach())


def test_closure_recomputes_the_losses():
    model = MultiTaskMLP(n_tasks=2)
    x, y = _data(2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Mean(), scope="all")
    reference = copy.deepcopy(model)
    opt.step(closure=lambda: task_losses(model, x, y))
    torch.stack(task_losses(reference, x, y)).mean().backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(TypeError, match="either losses or a closure"):
        opt.step([task_losses(model, x, y)[0]], closure=lambda: None)


def test_step_hooks_run_around_the_jd_step():
    model = MultiTaskMLP(n_tasks=2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    seen: list[str] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append("post"))
    opt.optimizer.register_step_pre_hook(lambda o, args, kwargs: seen.append("inner"))
    x, y = _data(2)
    opt.step(task_losses(model, x, y))
    assert seen == ["pre", "inner", "post"]


def test_zero_grad_is_delegated():
    model = MultiTaskMLP(n_tasks=2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = _data(2)
    opt.step(task_losses(model, x, y))
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_constructor_rejects_bad_arguments():
    model = nn.Linear(2, 2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"wraps a torch\.optim\.Optimizer"):
        JDOptimizer(model)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="already a JDOptimizer"):
        JDOptimizer(JDOptimizer(inner))
    with pytest.raises(TypeError, match="Aggregator"):
        JDOptimizer(inner, aggregator=lambda m: m.sum(0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="scope"):
        JDOptimizer(inner, scope="heads")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="nonfinite"):
        JDOptimizer(inner, nonfinite="ignore")  # type: ignore[arg-type]
