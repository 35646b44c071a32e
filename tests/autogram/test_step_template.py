"""The engine's per-structure template (``jdoptim.autogram._step.StepTemplate``): what a step
derives from its graph's structure (each call's parameters, the parameters taken straight from
autograd, the calls' sample layouts) is reused by the next steps of the same structure, and only
by them. Every Gramian here is checked against the explicit Jacobian of the same losses."""

from __future__ import annotations

import gc
import weakref

import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine
from tests.oracles import explicit_jacobian


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))


def _losses(model: nn.Module, seed: int) -> torch.Tensor:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return model(x)[:, 0] ** 2


def _templates(engine: Engine) -> list[object]:
    return [template for _, template in engine._templates.values()]


def _check_exact(engine: Engine, model: nn.Module, seed: int) -> None:
    losses = _losses(model, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    jacobian = explicit_jacobian(list(losses), params)
    gramian = engine.compute_gramian(losses)
    torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-12, atol=1e-12)


def test_steps_of_one_structure_share_one_template_and_stay_exact():
    model = _model().double()
    engine = Engine(model, batch_dim=0)
    for seed in range(4):
        _check_exact(engine, model, seed)
    assert len(_templates(engine)) == 1


def test_a_module_given_another_parameter_takes_a_new_template():
    """Two layers of one shape swap their weights: the calls, their shapes and the step's
    parameters are those of the structure before, but each call now differentiates the other's
    weight, so a template from before would give each call the wrong parameter."""
    model = _model().double()
    engine = Engine(model, batch_dim=0)
    _check_exact(engine, model, 0)
    _check_exact(engine, model, 1)
    (before,) = _templates(engine)
    first, second = model[0].weight, model[2].weight
    model[0].weight, model[2].weight = second, first
    _check_exact(engine, model, 2)
    (after,) = _templates(engine)  # (the structure's template replaced)
    assert after is not before


def test_the_same_step_parameters_in_other_modules_take_a_new_template():
    """The step's parameters given in one fixed order (as a caller of ``Engine.step`` may): two
    layers then swap their weights, and only the modules' own parameters tell the structures
    apart (a template from before would give each call the other's weight)."""
    model = _model().double()
    engine = Engine(model, batch_dim=0)
    fixed = list(model.parameters())
    found: list[list[object]] = []
    for seed in range(3):
        if seed == 2:
            first, second = model[0].weight, model[2].weight
            model[0].weight, model[2].weight = second, first
        losses = _losses(model, seed)
        jacobian = explicit_jacobian(list(losses), fixed)
        step = engine.step(losses, fixed, [], per_sample=True)
        with torch.no_grad():
            gramian = step.gramian()
        torch.testing.assert_close(gramian, jacobian @ jacobian.T, rtol=1e-12, atol=1e-12)
        found.append(_templates(engine))
    assert not found[0]  # (a structure's first step is the engine's check, no template)
    assert len(found[1]) == len(found[2]) == 1 and found[2][0] is not found[1][0]


def test_a_frozen_parameter_takes_a_new_template():
    model = _model().double()
    engine = Engine(model, batch_dim=0)
    _check_exact(engine, model, 0)
    _check_exact(engine, model, 1)
    (before,) = _templates(engine)
    model[2].bias.requires_grad_(False)
    _check_exact(engine, model, 2)
    (after,) = _templates(engine)
    assert after is not before


def test_a_replaced_parameter_is_not_kept_alive_by_a_template():
    """A structure keeps one template: once a parameter is replaced and a step has run, the
    engine holds the old one no more."""
    model = _model().double()
    engine = Engine(model, batch_dim=0)
    for seed in range(2):
        _check_exact(engine, model, seed)
    old = weakref.ref(model[2].weight)
    model[2].weight = nn.Parameter(model[2].weight.detach().clone())
    for seed in range(2, 4):
        _check_exact(engine, model, seed)
    gc.collect()
    assert old() is None


def test_task_losses_and_per_sample_losses_of_one_model_keep_apart():
    """The same model stepped alternately on task losses (a list: shared and specific
    parameters) and on one per-sample vector: each kind of step keeps its own template, and the
    update lands exactly where one explicit-Jacobian UPGrad step puts it."""
    model = _model().double()
    head = nn.Linear(4, 1).double()
    params = [*model.parameters(), *head.parameters()]
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.0), UPGrad(), modules=[model, head], batch_dim=0)
    for seed in range(3):
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        features = model[:4](x)
        per_sample = (model[4](features)[:, 0] ** 2 + head(features)[:, 0] ** 2) / 2
        jacobian = explicit_jacobian(list(per_sample), params)  # (keeps the graph)
        opt.zero_grad()
        opt.step(per_sample)
        grads = torch.cat([p.grad.reshape(-1) for p in params])
        expected = UPGrad()(jacobian)
        torch.testing.assert_close(grads, expected, rtol=1e-9, atol=1e-12)
        features = model[:4](x)
        tasks = [model[4](features).pow(2).mean(), head(features).pow(2).mean()]
        opt.zero_grad()
        opt.step(tasks)
    engine = opt._update_computer.engine
    assert len(_templates(engine)) == 2
