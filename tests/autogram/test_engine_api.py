"""Engine construction, refusals, hook lifetime and leaks."""

from __future__ import annotations

import gc
import warnings
import weakref

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram._records import CallRecord
from tests.models import FreeParam

from ._oracle import assert_gramian_close, explicit_jacobian


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


def test_overlapping_modules_are_refused() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"overlap.*'0'"):
        Engine(model, model[0])
    with pytest.raises(ValueError, match="overlap"):
        Engine(model[1], model)


def test_recursive_hooking() -> None:
    """A module with direct parameters is hooked whole, unless children of it have trainable
    parameters and it has no rule (a split parent: its children are hooked too); one without
    direct parameters is descended into."""
    free = FreeParam()
    with Engine(free):
        assert len(free._forward_hooks) == 1
        assert _hook_count(free) == 3  # the parent and its two Linear children
    free.linear1.requires_grad_(False)
    free.linear2.requires_grad_(False)
    with Engine(FreeParam()) as _, Engine(free):
        assert _hook_count(free) == 1  # no child with a trainable parameter: hooked whole
    seq = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    with Engine(seq):
        assert [len(m._forward_hooks) for m in seq] == [1, 0, 1]
    frozen = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    frozen[0].requires_grad_(False)
    with Engine(frozen):
        assert [len(m._forward_hooks) for m in frozen] == [0, 1]


@pytest.mark.parametrize(
    "module,match",
    [
        (
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)),
            r"^'1' \(BatchNorm1d\) normalises.*eval",
        ),
        (
            nn.BatchNorm1d(4, track_running_stats=False).eval(),
            r"^the model itself \(BatchNorm1d\).*GroupNorm",
        ),
    ],
)
def test_sample_mixing_modules_are_refused(module: nn.Module, match: str) -> None:
    """(A time-major recurrent layer or attention under ``batch_dim=0`` is not refused: it holds
    the samples where its ``batch_first`` says, ``tests/autogram/test_moved_samples.py``.)"""
    with pytest.raises(ValueError, match=match):
        Engine(module, batch_dim=0)
    Engine(module).close()  # fine without batch_dim


def test_messages_name_modules_by_their_path_in_the_model() -> None:
    """Issue 18: a module is named by its path in the model given (``'encoder.1'``), not by
    its place in the engine's list (``modules[0].1``); several modules get ``modules[i]``."""
    encoder = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model = nn.ModuleDict({"encoder": encoder, "head": nn.Linear(4, 1)})
    with pytest.raises(ValueError, match=r"^'encoder.1' \(BatchNorm1d\) normalises"):
        Engine(model, batch_dim=0)
    with pytest.raises(ValueError, match=r"^'modules\[1\].1' \(BatchNorm1d\) normalises"):
        Engine(model["head"], encoder, batch_dim=0)


def test_batchnorm_switched_to_training_is_refused_at_step() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4).eval())
    engine = Engine(model, batch_dim=0)
    model.train()
    with pytest.raises(ValueError, match="BatchNorm1d"):
        engine.compute_gramian(model(torch.randn(5, 3)).sum(1))


def test_close_and_context_manager_remove_hooks() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    engine = Engine(model)
    assert _hook_count(model) == 2
    engine.close()
    assert _hook_count(model) == 0 and engine.closed
    engine.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        engine.compute_gramian(model(torch.randn(4, 2)).squeeze(1))
    with Engine(model):
        assert _hook_count(model) == 2
    assert _hook_count(model) == 0


def test_dropped_engine_releases_its_hooks() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    engine = Engine(model)
    ref = weakref.ref(engine)
    del engine
    gc.collect()
    assert ref() is None
    assert _hook_count(model) == 0


def test_records_live_and_die_with_the_graph() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    engine = Engine(model)
    x = torch.randn(4, 2)
    out = model(x)
    records = [r for r, _ in out.grad_fn.metadata[engine._key]]
    assert len(records) == 1 and records[0].module is model[2]
    ref = weakref.ref(records[0])
    del records
    out.sum().backward()  # a plain backward ignores the records
    del out
    gc.collect()
    assert ref() is None
    with torch.no_grad():
        assert not model(x).requires_grad  # nothing recorded without grad mode
    engine.close()


def test_plain_backward_unchanged_by_hooks() -> None:
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))
    x = torch.randn(4, 2)
    model(x).pow(2).sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with Engine(model, batch_dim=0):
        model(x).pow(2).sum().backward()
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)


def test_nothing_accumulates_over_many_steps() -> None:
    """1,000 JD steps (and plain steps in between): no record, tensor or hook piles up."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3), UPGrad(), modules=model, batch_dim=0
    )
    x, y = torch.randn(6, 4), torch.randn(6, 2)

    def live() -> tuple[int, int]:
        gc.collect()
        objects = gc.get_objects()
        tensors = sum(1 for o in objects if issubclass(type(o), torch.Tensor))
        return tensors, sum(1 for o in objects if type(o) is CallRecord)

    counts = []
    for step in range(1000):
        opt.zero_grad()
        opt.step((model(x) - y).pow(2).sum(1))
        if step % 10 == 0:
            model(x).sum().backward()
        if step in (99, 999):
            counts.append(live())
    assert counts[0] == counts[1]
    assert counts[1][1] == 0


def test_module_whose_output_does_not_index_the_samples_is_computed_exactly() -> None:
    """A hooked module whose output does not index the samples (here it averages over them)
    cannot give per-sample rows from one backward pass. It used to be refused; the engine
    computes the first step with one backward row per loss, exactly; as ``head(a) * pool(c)``
    broadcasts the output along the samples, the engine then expands it along the batch (every
    sample's copy is the same ``pool(c)``), and the next steps are per-sample and exact. When an
    input of the module is differentiated upstream (its gradient would mix the samples), the
    check finds it and the step keeps the exact row-per-loss route, warning once, naming it."""

    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x * self.scale).mean(0)  # averages over the batch

    torch.manual_seed(0)
    pool, head = Pool(), nn.Linear(3, 3)
    a, c = torch.randn(5, 3), torch.randn(5, 3)
    with Engine(pool, head, batch_dim=0) as engine:
        for k in range(2):
            losses = (head(a) * pool(c)).sum(1)
            jacobian = explicit_jacobian(losses, engine.parameters()).double()
            step = engine.step(losses, engine.parameters(), [], per_sample=True)
            assert step.b == (1 if k == 0 else 5)
            with torch.no_grad():
                assert_gramian_close(step.gramian(), jacobian @ jacobian.T)
    first = nn.Linear(3, 3)
    with Engine(pool, head, first, batch_dim=0) as engine:
        for _ in range(2):
            losses = (head(a) * pool(first(c))).sum(1)
            jacobian = explicit_jacobian(losses, engine.parameters()).double()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", EngineRouteWarning)
                gramian = engine.compute_gramian(losses)
            assert_gramian_close(gramian, jacobian @ jacobian.T)
    assert any("'modules[2]' (Linear)" in str(w.message) for w in caught)


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_results_carry_no_graph(batch_dim: int | None) -> None:
    """The layer rules use the recorded inputs as they are (no detach), so the engine must run
    them without gradient tracking: neither the Gramian nor the ``.grad`` it writes may have a
    ``grad_fn`` (that would also keep the forward graph alive)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with Engine(model, batch_dim=batch_dim) as engine:
        out = model(x).sum(1) if batch_dim == 0 else model(x).sum(0)
        gramian = engine.compute_gramian(out)
    assert gramian.grad_fn is None and not gramian.requires_grad

    heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 1)])  # specific parameters only
    opt = JDOptimizer(torch.optim.SGD(heads.parameters(), lr=0.1), modules=heads)
    opt.step([head(x).mean() for head in heads])
    assert all(p.grad is not None and p.grad.grad_fn is None for p in heads.parameters())


@pytest.mark.parametrize("batch_dim", [None, 0])
def test_first_step_frees_the_graph_as_later_steps_do(batch_dim: int | None) -> None:
    """The first step of a structure keeps the graph for its check, then frees what a step
    frees: a second step on the same losses fails on the first step as on later ones."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    with Engine(model, batch_dim=batch_dim) as engine:
        for _ in range(2):
            losses = model(x).pow(2).sum(1) if batch_dim == 0 else model(x).pow(2).mean(0)
            engine.compute_gramian(losses)
            with pytest.raises(RuntimeError, match="backward through the graph a second time"):
                engine.compute_gramian(losses)


def test_the_check_runs_once_per_structure() -> None:
    """The engine checks its fast path on the first step of a graph structure only: not again
    for a new input that requires grad (a new leaf every step), again for a new batch size."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    checks = []
    with Engine(model, batch_dim=0) as engine:
        original = engine._certified_step

        def counted(*args, **kwargs):
            checks.append(1)
            return original(*args, **kwargs)

        engine._certified_step = counted  # type: ignore[method-assign]
        for batch in (5, 5, 5, 6, 6):
            x = torch.randn(batch, 3, requires_grad=True)
            engine.compute_gramian(model(x).pow(2).sum(1))
    assert len(checks) == 2
