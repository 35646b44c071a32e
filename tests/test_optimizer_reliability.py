"""Reliability around the edges of a step (issue 19, and the errors of issue 18).

Every state comparison is bit for bit (``tests/_snapshots.py``); gradients are compared with
``torch.autograd.grad`` of the same losses, computed independently.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import (
    DBMTL,
    IMTL,
    PCD,
    Aggregator,
    Constant,
    CRMOGMWeighting,
    ExcessMTL,
    GradDrop,
    GradNorm,
    GradVac,
    GradVacWeighting,
    GramianWeightedAggregator,
    MoCo,
    NashMTL,
    PCGrad,
    Random,
    UPGrad,
    UPGradWeighting,
)
from jdoptim.losses import StaleGraphError
from tests._snapshots import assert_unchanged, same, snapshot
from tests.models import MultiTaskMLP, task_losses

STATEFUL: dict[str, Callable[[], Aggregator]] = {
    "gradvac": lambda: GradVac(beta=0.5, seed=1),
    "nashmtl": lambda: NashMTL(max_norm=0.5),
    "pcgrad": lambda: PCGrad(seed=2),
    "random": lambda: Random(seed=3),
    "excessmtl": ExcessMTL,
    "graddrop": lambda: GradDrop(seed=4),
    # The methods of issue 17 (jdoptim/aggregation: Stateful, state in get_extra_state).
    "crmogm": lambda: GramianWeightedAggregator(CRMOGMWeighting(UPGradWeighting())),
    "pcd": PCD,
    "gradnorm": GradNorm,
    "imtl": IMTL,
    "dbmtl": DBMTL,
    "moco": MoCo,
}


def _setup(aggregator: Aggregator, engine: bool, **kwargs):
    torch.manual_seed(0)
    model = MultiTaskMLP(n_tasks=2)
    adam = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = JDOptimizer(adam, aggregator, modules=model if engine else None, **kwargs)
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for _ in range(2):  # non-trivial optimizer and aggregator state
        opt.zero_grad()
        opt.step(task_losses(model, x, y))
    return model, opt, x, y


def _same_parameters(a: nn.Module, b: nn.Module) -> bool:
    return same([p.detach() for p in a.parameters()], [p.detach() for p in b.parameters()])


def _head_nan(model: MultiTaskMLP) -> Tensor:
    """A finite term whose gradient on head 1's bias (a task-specific parameter) is infinite:
    the Gramian of the shared parameters stays finite, so the aggregator runs first."""
    bias = model.heads[1].bias
    return (bias - bias.detach()).abs().sqrt().sum()


# -- 19.1: a refused or skipped step leaves the aggregator's state as it was -----------------


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
@pytest.mark.parametrize("method", list(STATEFUL))
def test_a_refused_step_leaves_the_aggregator_as_it_was(method, engine, nonfinite):
    model, opt, x, y = _setup(STATEFUL[method](), engine, nonfinite=nonfinite)
    twin_model, twin_opt, _, _ = _setup(STATEFUL[method](), engine)  # never sees the refusal
    before = snapshot(model, opt)
    l1, l2 = task_losses(model, x, y)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="aggregated gradient"):
            opt.step([l1, l2 + _head_nan(model)])
    else:
        assert opt.step([l1, l2 + _head_nan(model)]).skipped
    assert_unchanged(model, opt, before)
    # Skipping and resuming is the same as never having seen the step.
    for net, optimizer in ((model, opt), (twin_model, twin_opt)):
        optimizer.zero_grad()
        optimizer.step(task_losses(net, x, y))
    assert _same_parameters(model, twin_model)
    assert same(opt.aggregator.state_dict(), twin_opt.aggregator.state_dict())


# -- 19.3: one loss goes through the aggregator ------------------------------------------------


def _autograd_grads(model: nn.Module, loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters()), retain_graph=True))


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
@pytest.mark.parametrize("form", ["list", "0-d", "per-sample of length 1"])
def test_one_loss_goes_through_the_aggregator(engine, form):
    torch.manual_seed(0)
    model = MultiTaskMLP(n_tasks=1)
    x, y = torch.randn(1, 6), torch.randn(1, 1)
    loss = (model(x)[0] - y[:, 0]).pow(2)  # [1]
    expected = [0.5 * g for g in _autograd_grads(model, loss.sum())]
    batch_dim = 0 if form == "per-sample of length 1" else None
    modules = model if engine else None
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), Constant(torch.tensor([0.5])),
                      modules=modules, batch_dim=batch_dim)  # fmt: skip
    losses = {"list": [loss.sum()], "0-d": loss.sum(), "per-sample of length 1": loss}[form]
    record = opt.step(losses)
    assert record.weights is not None and record.weights.tolist() == [0.5]
    for param, grad in zip(model.parameters(), expected):
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_one_loss_is_clipped_by_nash_mtl(engine):
    torch.manual_seed(0)
    model = MultiTaskMLP(n_tasks=1)
    x, y = torch.randn(8, 6), 10 + torch.randn(8, 1)
    loss = (model(x)[0] - y[:, 0]).pow(2).mean()
    raw = torch.cat([g.reshape(-1) for g in _autograd_grads(model, loss)])
    max_norm = 0.1
    assert raw.norm() > 10 * max_norm
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), NashMTL(max_norm=max_norm),
                      modules=model if engine else None)  # fmt: skip
    opt.step([loss])
    update = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(update.norm(), torch.tensor(max_norm), rtol=1e-5, atol=0)
    torch.testing.assert_close(update / update.norm(), raw / raw.norm(), rtol=1e-5, atol=1e-7)


# -- 19.4 and 18: stepping on losses already stepped on, backward() before step() ------------


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_stepping_twice_on_the_same_losses_is_refused_even_where_torch_is_silent(engine):
    # SGD on one Linear layer fed with data: the graph saves no parameter, so torch would
    # happily differentiate the stale losses again (gradients of the old parameters).
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    x = torch.randn(6, 4)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad(),
                      modules=model if engine else None)  # fmt: skip
    out = model(x)
    losses = [out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()]
    opt.step(losses)
    before = snapshot(model, opt)
    with pytest.raises(StaleGraphError, match="Recompute the losses each step"):
        opt.step(losses)
    assert_unchanged(model, opt, before)
    out = model(x)
    opt.step([out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()])  # recomputed: fine


def test_stepping_twice_with_adam_gives_the_library_error():
    model, opt, x, y = _setup(UPGrad(), engine=False)
    losses = task_losses(model, x, y)
    opt.step(losses)
    before = snapshot(model, opt)
    with pytest.raises(StaleGraphError, match="already used by a step"):
        opt.step(losses)
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_backward_then_step_says_step_replaces_backward(engine):
    model, opt, x, y = _setup(UPGrad(), engine)
    losses = task_losses(model, x, y)
    sum(losses).backward()
    before = snapshot(model, opt)
    with pytest.raises(StaleGraphError, match=r"replaces backward\(\)") as info:
        opt.step(losses)
    assert "retain_graph=True if you need" not in str(info.value)  # torch's wrong advice
    assert_unchanged(model, opt, before)


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_parameters_modified_in_place_after_the_forward_give_the_library_error(engine):
    model, opt, x, y = _setup(UPGrad(), engine)
    losses = task_losses(model, x, y)
    with torch.no_grad():
        model.trunk[2].weight.mul_(1.5)  # saved by the backward of the layers after it
    before = snapshot(model, opt)
    with pytest.raises(StaleGraphError, match="modified in place"):
        opt.step(losses)
    assert_unchanged(model, opt, before)


# -- 19.5: load_state_dict is atomic and refuses another method's state ----------------------


def _trained(aggregator: Aggregator):
    model, opt, _, _ = _setup(aggregator, engine=False)
    return model, opt


def test_a_checkpoint_of_another_method_is_refused_by_name():
    _, source = _trained(GradVac(beta=0.5, seed=1))
    model, opt = _trained(PCGrad(seed=2))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"GradVac aggregator.*PCGrad"):
        opt.load_state_dict(source.state_dict())
    assert_unchanged(model, opt, before)
    _, nash = _trained(NashMTL())
    model, opt = _trained(GradVac(seed=5))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="NashMTL aggregator"):  # was a KeyError, half loaded
        opt.load_state_dict(nash.state_dict())
    assert_unchanged(model, opt, before)


def test_an_unnamed_checkpoint_of_another_method_is_refused_by_its_entries():
    _, source = _trained(GradVac(beta=0.5, seed=1))
    state = source.state_dict()
    del state["jdoptim"]["aggregator_class"]  # as older versions wrote it
    model, opt = _trained(PCGrad(seed=2))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match="entries"):
        opt.load_state_dict(state)
    assert_unchanged(model, opt, before)


def test_a_failing_optimizer_load_leaves_the_aggregator_as_it_was():
    _, source = _trained(GradVac(beta=0.5, seed=1))
    state = source.state_dict()
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    model, opt = _trained(GradVac(beta=0.5, seed=9))
    before = snapshot(model, opt)
    with pytest.raises(ValueError):
        opt.load_state_dict(state)
    assert_unchanged(model, opt, before)


def test_a_failing_aggregator_load_puts_the_optimizer_back():
    _, source = _trained(GradVac(beta=0.5, seed=1))
    state = source.state_dict()
    extra = state["jdoptim"]["aggregator"]["weighting._extra_state"]
    # GradVac loads its generator, then fails on the targets: a half-loaded aggregator.
    extra["target_similarities"] = "not a tensor"
    model, opt = _trained(GradVac(beta=0.5, seed=9))
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match="target_similarities"):
        opt.load_state_dict(state)
    assert_unchanged(model, opt, before)
    opt.zero_grad()
    opt.step(task_losses(model, torch.randn(8, 6), torch.randn(8, 2)))  # still usable


def test_a_checkpoint_of_the_same_method_resumes_bit_for_bit():
    model, opt = _trained(GradVac(beta=0.5, seed=1))
    twin_model = copy.deepcopy(model)
    twin_opt = JDOptimizer(torch.optim.Adam(twin_model.parameters(), lr=1e-2),
                           GradVac(beta=0.5, seed=8))  # fmt: skip
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # torch shares live tensors
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for net, optimizer in ((model, opt), (twin_model, twin_opt)):
        optimizer.zero_grad()
        optimizer.step(task_losses(net, x, y))
    assert _same_parameters(model, twin_model)


# -- 19.6 (meta), 19.9 (no_grad), 18 (errors that name the fix) ------------------------------


def test_meta_losses_and_tensors_get_a_clear_error():
    model = MultiTaskMLP(2).to("meta")
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
    x, y = torch.randn(4, 6, device="meta"), torch.randn(4, 2, device="meta")
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        opt.step(task_losses(model, x, y))
    from jdoptim.linalg.finite import is_finite

    with pytest.raises(ValueError, match="'meta' device"):
        is_finite(torch.ones(3, device="meta"))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_a_step_under_no_grad_works_as_outside(mode, engine):
    model, opt, x, y = _setup(UPGrad(), engine)
    twin_model, twin_opt, _, _ = _setup(UPGrad(), engine)
    losses, twin_losses = task_losses(model, x, y), task_losses(twin_model, x, y)
    with mode():
        opt.step(losses)
    twin_opt.step(twin_losses)
    assert _same_parameters(model, twin_model)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_losses_computed_under_no_grad_name_the_mode(mode):
    model, opt, x, y = _setup(UPGrad(), engine=False)
    message = r"called under torch.no_grad\(\) or torch.inference"
    with mode(), pytest.raises(ValueError, match=message):
        opt.step(task_losses(model, x, y))


def test_an_aggregator_class_or_string_says_pass_an_instance():
    sgd = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"class: pass an instance, aggregator=UPGrad\(\)"):
        JDOptimizer(sgd, UPGrad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"GramianWeightedAggregator\(GradVacWeighting\(\)\)"):
        JDOptimizer(sgd, GradVacWeighting)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"string: pass an instance, e.g. aggregator=UPGrad\(\)"):
        JDOptimizer(sgd, "upgrad")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"aggregator=NashMTL\(\)"):
        JDOptimizer(sgd, "nash_mtl")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"GramianWeightedAggregator\(GradVacWeighting"):
        JDOptimizer(sgd, GradVacWeighting())  # type: ignore[arg-type]


def test_a_positional_closure_points_to_the_keyword():
    model, opt, x, y = _setup(UPGrad(), engine=False)
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"opt.step\(closure=closure\)"):
        opt.step(lambda: task_losses(model, x, y))
    assert_unchanged(model, opt, before)


def test_a_loss_reaching_only_foreign_parameters_is_recorded_and_warned_once():
    model, opt, x, y = _setup(UPGrad(), engine=False)
    other = nn.Linear(6, 1)
    l1, l2 = task_losses(model, x, y)
    with pytest.warns(UserWarning, match=r"foreign.*reach") as caught:
        record = opt.step({"a": l1, "b": l2, "foreign": other(x).pow(2).mean()})
    assert caught[0].filename == __file__
    assert record.idle_losses == ("foreign",)
    assert record.losses_by_name == dict(zip(record.names, record.losses.tolist()))
    l1, l2 = task_losses(model, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per optimizer
        record = opt.step({"a": l1, "b": l2, "foreign": other(x).pow(2).mean()})
    assert record.idle_losses == ("foreign",)
    l1, l2 = task_losses(model, x, y)
    assert opt.step([l1, l2]).idle_losses == ()


def test_losses_by_name_gives_each_value():
    model, opt, x, y = _setup(UPGrad(), engine=False)
    l1, l2 = task_losses(model, x, y)
    record = opt.step({"depth": l1, "seg": l2})
    assert record.losses_by_name == {"depth": l1.item(), "seg": l2.item()}


def test_per_sample_losses_without_batch_dim_warn_with_the_fix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(5, 6)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modules=model)
    with pytest.warns(UserWarning, match="batch_dim=0") as caught:
        opt.step(model(x).squeeze(1).pow(2))
    assert caught[0].filename == __file__  # points at the user's line, not into torch.optim
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(model(x).squeeze(1).pow(2))  # once per optimizer
        stacked = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modules=model)
        out = model(x)
        stacked.step(torch.stack([out.mean(), out.pow(2).mean()]))  # task losses: no warning
        per_sample = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modules=model,
                                 batch_dim=0)  # fmt: skip
        per_sample.step(model(x).squeeze(1).pow(2))
        jacobian = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))
        jacobian.step(model(x).squeeze(1).pow(2))
        wide = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        tasks = JDOptimizer(torch.optim.SGD(wide.parameters(), lr=0.1), modules=wide)
        tasks.step(wide(x).pow(2).mean(dim=0))  # 3 task losses from a batch of 5: no warning


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_a_step_the_grad_scaler_skips_leaves_the_aggregator_as_it_was(engine):
    """The Gramian is finite, so GradVac runs; a task-specific gradient is not, so the scaler
    skips the step: GradVac's EMA and generator must be as before, as Adam's state is."""
    model, opt, x, y = _setup(GradVac(beta=0.5, seed=1), engine)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = snapshot(model, opt)
    l1, l2 = task_losses(model, x, y)
    record = opt.step([l1, l2 + _head_nan(model)], grad_scaler=scaler)
    assert record.skipped and "GradScaler" in str(record.reason)
    before["grads"] = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    assert_unchanged(model, opt, before)  # .grad holds the scaler's NaNs, as with backward()


def test_no_hook_is_left_behind_by_dropped_optimizers():
    """The per-sample warning's forward pre-hook goes with its optimizer (as the engine's
    hooks do): 20 optimizers built and dropped leave the model without hooks."""
    import gc

    model = MultiTaskMLP(2)
    x, y = torch.randn(4, 6), torch.randn(4, 2)
    for _ in range(20):
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), modules=model)
        opt.step(task_losses(model, x, y))
    del opt
    gc.collect()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("engine", [False, True], ids=["jacobian", "engine"])
def test_reentrant_checkpointing_gets_the_library_error(engine):
    """transformers' Llama with reentrant activation checkpointing: torch cannot take the JD
    step's partial backward passes through it; the error says to use the non-reentrant form
    (and how, for a transformers model), and nothing changes."""
    pytest.importorskip("transformers")
    from tests.autogram.test_real_models import _llama_checkpointed

    torch.manual_seed(0)
    model, _ = _llama_checkpointed(reentrant=True)
    model.train()
    opt = JDOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2), UPGrad(), modules=model if engine else None
    )
    tokens = torch.randint(0, 40, (4, 8))  # (the vocabulary of test_real_models)
    logits = model(input_ids=tokens).logits
    losses = [logits[:, :4].pow(2).mean(), logits[:, 4:].sin().mean()]
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="use_reentrant': False"):
        opt.step(losses)
    assert_unchanged(model, opt, before)
