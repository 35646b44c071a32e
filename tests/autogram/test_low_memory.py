"""The engine's low-memory step (``low_memory=True``, :mod:`jdoptim.autogram._streaming`)
against the explicit Jacobian of the same losses.

The low-memory step takes each call's Gramian term during the backward pass and gives the
update by a second backward pass; the first step of each graph structure (which the engine
checks) streams too. Most checks here first run warm-up steps (on other forwards), as a
structure may change on the first steps (a position embedding expanded along the batch), then
check a step that a spy confirms was a low-memory one: the
engine's Gramian equals ``J Jᵀ``, and ``JDOptimizer``'s ``.grad`` equals ``Jᵀ w`` with ``w``
the UPGrad weights of that explicit Gramian (and each task head's own gradient with
``scope="shared"``). Models: every real model of :mod:`tests.autogram.test_real_models` in its
three loss layouts (tied heads, re-run modules with dropout, position embeddings expanded along
the batch, biases read at their additions, calls nested in DoRA's), plus small models for
parameters used outside the hooked calls, parameters used by several calls, task heads, graph
release and the fallback where ``torch.func.vmap`` cannot run the backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from jdoptim import JDOptimizer, StaleGraphError
from jdoptim.aggregation import UPGrad, UPGradWeighting
from jdoptim.autogram import Engine, EngineRouteWarning
from jdoptim.autogram._streaming import StreamingStep

from ._oracle import as_square, explicit_jacobian
from ._same_losses import all_aggregated_optimizer, trainable
from .test_real_models import LAYOUTS, MODELS, _cases, _relative_error

WARM_UP = 2  # forwards before the checked one: the first may change the structure (expansion)


@contextmanager
def streamed_steps() -> Iterator[list[int]]:
    """Counts the low-memory steps made inside the block (a spy: the step runs unchanged)."""
    count = [0]
    original = StreamingStep._differentiate

    def counting(self: StreamingStep, *args: object) -> None:
        count[0] += 1
        original(self, *args)  # type: ignore[arg-type]

    StreamingStep._differentiate = counting  # type: ignore[method-assign]
    try:
        yield count
    finally:
        StreamingStep._differentiate = original  # type: ignore[method-assign]


def _flat_grads(params: list[Tensor]) -> Tensor:
    return torch.cat(
        [(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in params]
    )


#: models with float32 parts in float64 (transformers' RMSNorm and T5's norm compute their
#: variance in float32): autograd's gradient of ``Σ wᵢ ℓᵢ`` and ``Jᵀ w`` from autograd's rows
#: round those parts differently, by about float32's epsilon relative to the largest entry
FLOAT32_PARTS = {"llama", "llama_checkpointed", "llama_lora", "llama_dora", "t5"}


def check_low_memory(
    model: nn.Module,
    run: Callable[[nn.Module], Tensor],
    batch_dim: int | None,
    grad_tolerance: float = 1e-9,
) -> None:
    """Warm-up steps, then one checked low-memory step of JDOptimizer: its Gramian, weights and
    ``.grad`` against the explicit Jacobian of the same losses."""
    params = trainable(model)
    opt = all_aggregated_optimizer(model, batch_dim, low_memory=True)
    for _ in range(WARM_UP):
        opt.step(run(model))
    with streamed_steps() as streamed:
        losses = run(model)
        jacobian = explicit_jacobian(losses, params)
        expected = jacobian @ jacobian.T
        opt.zero_grad()
        record = opt.step(losses)
    assert streamed[0] == 1, "the checked step was a low-memory one"
    assert record.gramian is not None and record.weights is not None
    assert _relative_error(record.gramian, expected) < 1e-9, "JDOptimizer's Gramian"
    weights = UPGradWeighting()(expected)
    torch.testing.assert_close(record.weights.reshape(-1).double(), weights, atol=1e-6, rtol=1e-6)
    expected_grads = jacobian.T @ record.weights.reshape(-1).double()
    assert _relative_error(_flat_grads(params), expected_grads) < grad_tolerance, ".grad"


def check_engine_low_memory(
    model: nn.Module, run: Callable[[nn.Module], Tensor], batch_dim: int | None
) -> None:
    """Warm-up steps, then one checked low-memory ``Engine.compute_gramian``."""
    params = trainable(model)
    with Engine(model, batch_dim=batch_dim, low_memory=True) as engine:
        for _ in range(WARM_UP):
            engine.compute_gramian(run(model))
        with streamed_steps() as streamed:
            losses = run(model)
            jacobian = explicit_jacobian(losses, params)
            gramian = engine.compute_gramian(losses)
    assert streamed[0] == 1, "the checked step was a low-memory one"
    expected = jacobian @ jacobian.T
    assert _relative_error(as_square(gramian, losses.shape), expected) < 1e-9, "engine Gramian"


@pytest.mark.parametrize("name, layout", _cases())
def test_real_model_low_memory(name: str, layout: str) -> None:
    torch.manual_seed(0)
    model, run = MODELS[name]()
    model = model.double().train()
    pick, batch_dim = LAYOUTS[layout]
    tolerance = 1e-6 if name in FLOAT32_PARTS else 1e-9
    check_low_memory(model, lambda m: pick(run(m)), batch_dim, tolerance)


class _Trunk(nn.Module):
    """A trunk that uses ``a.weight`` in its own forward too (outside ``a``'s call: rows from
    autograd), calls ``b`` twice (parameters used by several calls) and has two task heads. It
    has no direct parameter, so its layers are hooked, not itself."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6)
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 1)])

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(self.outputs(x), dim=1)  # [b, 2]

    def outputs(self, x: Tensor) -> list[Tensor]:
        """Each head's output ``[b, 1]`` (separate tensors: each loss reaches its head only)."""
        h = torch.tanh(self.a(x)) + 0.5 * F.linear(x, self.a.weight)
        h = torch.tanh(self.b(torch.tanh(self.b(h))))
        return [head(h) for head in self.heads]


def _trunk_run(x: Tensor, y: Tensor) -> Callable[[nn.Module], Tensor]:
    return lambda m: (m(x) - y).pow(2)


def _trunk_case(layout: str) -> tuple[nn.Module, Callable[[nn.Module], Tensor], int | None]:
    """A float64 :class:`_Trunk`, its losses in ``layout`` and their ``batch_dim``."""
    torch.manual_seed(0)
    model = _Trunk().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    pick, batch_dim = LAYOUTS[layout]
    run = _trunk_run(x, y)
    return model, lambda m: pick(run(m)), batch_dim


#: per-sample steps with parameters used outside hooked calls warn of their route (as intended)
_EXPLICIT_ROUTE = pytest.mark.filterwarnings("ignore::jdoptim.autogram.EngineRouteWarning")


@_EXPLICIT_ROUTE
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_explicit_and_several_calls_low_memory(layout: str) -> None:
    model, losses_of, batch_dim = _trunk_case(layout)
    check_low_memory(model, losses_of, batch_dim)
    check_engine_low_memory(model, losses_of, batch_dim)


def test_task_heads_get_their_own_gradient() -> None:
    """``scope="shared"``: the trunk gets ``Jᵀ w`` over the trunk's parameters, each head the
    gradient of its own loss (unweighted), as on the ordinary route."""
    torch.manual_seed(0)
    model = _Trunk().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    trunk = [*model.a.parameters(), *model.b.parameters()]
    heads = [list(h.parameters()) for h in model.heads]
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), UPGrad(), modules=model, low_memory=True
    )

    def run() -> list[Tensor]:
        return [(out - y[:, k : k + 1]).pow(2).mean() for k, out in enumerate(model.outputs(x))]

    for _ in range(WARM_UP):
        opt.step(run())
    with streamed_steps() as streamed:
        losses = run()
        jacobian = explicit_jacobian(torch.stack(losses), trunk)
        head_grads = [torch.autograd.grad(losses[k], heads[k], retain_graph=True) for k in (0, 1)]
        opt.zero_grad()
        record = opt.step(losses)
    assert streamed[0] == 1
    assert len(record.specific) == 4
    weights = UPGradWeighting()(jacobian @ jacobian.T)
    assert record.weights is not None
    torch.testing.assert_close(record.weights.double(), weights, atol=1e-6, rtol=1e-6)
    expected = jacobian.T @ record.weights.double()
    assert _relative_error(_flat_grads(trunk), expected) < 1e-10
    for k in (0, 1):
        for p, g in zip(heads[k], head_grads[k]):
            torch.testing.assert_close(p.grad, g, atol=1e-12, rtol=1e-10)


@_EXPLICIT_ROUTE
def test_stepping_twice_on_the_same_losses_is_refused() -> None:
    """The second backward pass frees the graph as the ordinary step's one backward does; a
    Gramian alone (``compute_gramian``) frees it too, unless ``retain_graph``."""
    torch.manual_seed(0)
    model = _Trunk()
    x, y = torch.randn(5, 4), torch.randn(5, 2)
    run = _trunk_run(x, y)
    opt = JDOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), modules=model, batch_dim=0, low_memory=True
    )
    for _ in range(WARM_UP):
        opt.step(run(model)[:, 0])
    with streamed_steps() as streamed:
        losses = run(model)[:, 0]
        opt.step(losses)
        with pytest.raises(StaleGraphError):
            opt.step(losses)
    assert streamed[0] == 1
    with Engine(model, batch_dim=0, low_memory=True) as engine:
        for _ in range(WARM_UP):
            engine.compute_gramian(run(model)[:, 0])
        losses = run(model)[:, 0]
        kept = engine.compute_gramian(losses, retain_graph=True)
        torch.testing.assert_close(engine.compute_gramian(losses), kept)
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            losses.sum().backward()


@_EXPLICIT_ROUTE
@pytest.mark.parametrize("layout", ["batch_tasks", "tasks"])
def test_public_way_out_of_vmap(layout: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without functorch's primitives for leaving a vmap level, the rows reach the rules
    through a ``torch.autograd.Function``'s vmap rule: the same results."""
    monkeypatch.delattr(torch._C._functorch, "pop_dynamic_layer_stack")
    check_low_memory(*_trunk_case(layout))


class _SquareSkippingZeros(torch.autograd.Function):
    """``x²``, whose backward skips the work for a zero gradient: a test on the gradient's
    values, which no vmap can batch (the ordinary step's batched backward falls back to a loop
    of rows there; the low-memory step cannot)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        if not grad.any():
            return torch.zeros_like(x)
        return 2 * x * grad


def test_falls_back_where_vmap_cannot_run_the_backward() -> None:
    """Task rows need ``torch.func.vmap`` of the backward; where it fails, the engine warns once
    and takes the ordinary step, exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def run(m: nn.Module) -> Tensor:
        return _SquareSkippingZeros.apply(m[1](_SquareSkippingZeros.apply(m[0](x)))).mean(0)

    params = list(model.parameters())
    with Engine(model, low_memory=True) as engine:
        with pytest.warns(EngineRouteWarning, match="low_memory"):
            engine.compute_gramian(run(model))
        losses = run(model)
        jacobian = explicit_jacobian(losses, params)
        gramian = engine.compute_gramian(losses)
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-12


class _Checkpointed(nn.Module):
    """Two blocks with dropout under activation checkpointing: their backward recomputes the
    blocks, drawing the dropout masks again from the saved generator state."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Dropout(0.3)) for _ in range(2)]
        )
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return self.head(x)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_checkpointed_dropout_low_memory(layout: str) -> None:
    """Dropout recomputed inside the backward: one draw for every row (``randomness="same"``),
    the forward's masks, so the step is exact."""
    torch.manual_seed(0)
    model = _Checkpointed().double().train()
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    pick, batch_dim = LAYOUTS[layout]
    check_low_memory(model, lambda m: pick((m(x) - y).pow(2)), batch_dim)


def test_refused_without_the_engine() -> None:
    model = nn.Linear(3, 2)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="modules=model"):
        JDOptimizer(sgd, UPGrad(), low_memory=True)


@pytest.mark.parametrize("per_sample", [False, True], ids=["tasks", "per-sample"])
def test_sparse_embedding_low_memory(per_sample: bool) -> None:
    """A sparse table: its Gramian rows are compact during the backward, and the second
    backward gives its ``.grad`` sparse, on the looked-up rows, as ``backward()`` does."""
    from tests.test_sparse_embedding import Recommender, _batch, _flat, _jacobian, _looked_up

    torch.manual_seed(0)
    model = Recommender().double()
    items, users = _batch()
    params = list(model.parameters())
    opt = all_aggregated_optimizer(model, 0 if per_sample else None, low_memory=True)

    def run() -> Tensor:
        out = model(items, users)
        return out[:, 0] if per_sample else out.pow(2).mean(0)

    for _ in range(WARM_UP):
        opt.step(run())
    with streamed_steps() as streamed:
        losses = run()
        jacobian = _jacobian(losses, params)
        opt.zero_grad()
        record = opt.step(losses)
    assert streamed[0] == 1
    assert record.weights is not None
    torch.testing.assert_close(record.gramian, jacobian @ jacobian.T)
    torch.testing.assert_close(_flat(params), jacobian.T @ record.weights)
    grad = model.items.weight.grad
    assert grad is not None and grad.layout is torch.sparse_coo
    assert set(grad.coalesce().indices()[0].tolist()) == _looked_up(items, 0)


def test_grad_scaler_low_memory() -> None:
    """Under a ``GradScaler`` the scaled losses go through both backward passes; the step
    leaves the unscaled ``Jᵀ w`` in ``.grad``."""
    torch.manual_seed(0)
    model = _Trunk()
    x, y = torch.randn(16, 4), torch.randn(16, 2)
    params = list(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt = JDOptimizer(
        torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, scope="all", low_memory=True
    )
    for _ in range(WARM_UP):
        opt.step(list(_trunk_run(x, y)(model).mean(0)), grad_scaler=scaler)
        scaler.update()
    with streamed_steps() as streamed:
        losses = _trunk_run(x, y)(model).mean(0)
        jacobian = explicit_jacobian(losses, params).double()
        opt.zero_grad()
        record = opt.step(list(losses), grad_scaler=scaler)
    assert streamed[0] == 1 and not record.skipped
    assert record.weights is not None
    weights = UPGradWeighting()(jacobian @ jacobian.T)
    torch.testing.assert_close(record.weights.double(), weights, rtol=1e-4, atol=1e-5)
    expected = jacobian.T @ record.weights.double()
    assert _relative_error(_flat_grads(params), expected) < 1e-5


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_the_checked_first_step_streams_too(layout: str) -> None:
    """The engine's check of a new graph structure runs on a low-memory step as well (each
    rule's ``Jᵀv`` gathered during the backward): the first step holds no output gradient and
    is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    pick, batch_dim = LAYOUTS[layout]
    params = list(model.parameters())
    opt = all_aggregated_optimizer(model, batch_dim, low_memory=True)
    with streamed_steps() as streamed:
        losses = pick((model(x) - y).pow(2))
        jacobian = explicit_jacobian(losses, params)
        record = opt.step(losses)
    assert streamed[0] == 1
    assert record.weights is not None
    weights = UPGradWeighting()(jacobian @ jacobian.T)
    torch.testing.assert_close(record.weights.reshape(-1).double(), weights, atol=1e-6, rtol=1e-6)
    assert _relative_error(_flat_grads(params), jacobian.T @ weights) < 1e-6


def test_an_error_of_the_step_itself_leaves_the_mode_on() -> None:
    """A backward that fails for the step's own reason (a tensor the graph needs was changed in
    place) fails the ordinary step as well: the error propagates, nothing is blamed on the
    low-memory mode, and the next, valid step is a low-memory one."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)

    def broken() -> Tensor:
        h = torch.sigmoid(model[0](x))
        losses = model[1](h).pow(2).mean(0)
        h.add_(1.0)  # sigmoid's backward needs its output as it was
        return losses

    with warnings.catch_warnings(), Engine(model, low_memory=True) as engine:
        warnings.simplefilter("error", EngineRouteWarning)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            engine.compute_gramian(broken())
        with streamed_steps() as streamed:
            losses = model(x).pow(2).mean(0)
            jacobian = explicit_jacobian(losses, list(model.parameters()))
            gramian = engine.compute_gramian(losses)
    assert streamed[0] == 1
    assert _relative_error(gramian, jacobian @ jacobian.T) < 1e-12


def test_the_low_memory_step_allocates_less() -> None:
    """The example's CNN with 4 task losses: the peak of one step's tensors (torch.profiler's
    allocation events, deterministic on the CPU) is lower with ``low_memory=True`` (measured
    20 MB against 30 MB; a plain summed step: 6 MB), and both runs take the same steps."""
    import runpy
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "examples" / "low_memory.py"
    peaks = runpy.run_path(str(example))["main"]()
    assert peaks["low_memory"] < 0.8 * peaks["default"]


def test_out_of_memory_in_the_engine_step_names_low_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An allocator failure during the default engine step (injected here: no machine runs out
    of memory on cue) keeps its type and gains the advice to use ``low_memory=True``; with the
    mode on, it is passed on as it is. Nothing is updated."""
    from jdoptim.autogram.rules._base import LayerRule
    from jdoptim.autogram.rules.linear import LinearLikeRule

    def exhausted(self: object, params: object) -> Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    # (in the low-memory step the rules run inside the backward: an allocator failure there is
    # neither a failed re-run for the engine's check nor a backward that vmap cannot run; the
    # default step forms the rows of layers whose Gramian takes them, and holds them)
    monkeypatch.setattr(LayerRule, "gramian", exhausted)
    monkeypatch.setattr(LinearLikeRule, "jacobians", exhausted)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    x = torch.randn(5, 4)
    before = [p.detach().clone() for p in model.parameters()]
    for low_memory in (False, True):
        opt = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), modules=model, low_memory=low_memory
        )
        with warnings.catch_warnings(), pytest.raises(torch.OutOfMemoryError) as caught:
            warnings.simplefilter("error", EngineRouteWarning)
            opt.step(list(model(x).pow(2).mean(0)))
        assert ("low_memory=True" in str(caught.value)) is not low_memory
        assert "Tried to allocate 2.00 GiB" in str(caught.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_sequence_first_task_rows_low_memory() -> None:
    """``batch_dim=1`` and ``[tasks, batch]`` losses: the rows are not in the losses' row-major
    order, so the check's ``v`` and the update's weights are reordered; both exact."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, dtype=torch.float64)
    heads = nn.Linear(8, 2, dtype=torch.float64)
    model = nn.ModuleDict({"layer": layer, "heads": heads}).train()
    x = torch.randn(5, 4, 8, dtype=torch.float64)  # [s, b, d]

    def run(m: nn.Module) -> Tensor:
        return m["heads"](m["layer"](x)).pow(2).mean(0).T  # [tasks, b]

    check_low_memory(model, run, 1)


#: CUDA too where a device is present: its backward runs in autograd's worker threads, where the
#: rows reach the rules by the public autograd.Function route, and dropout draws from its own
#: generator
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("device", DEVICES)
def test_low_memory_on_each_device(device: str, layout: str) -> None:
    """A transformer encoder layer with dropout in training mode and a head, on each device."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    model = nn.ModuleDict({"layer": layer, "head": nn.Linear(8, 2)}).double().train().to(device)
    x = torch.randn(4, 5, 8, dtype=torch.float64, device=device)
    pick, batch_dim = LAYOUTS[layout]

    def run(m: nn.Module) -> Tensor:
        return pick(m["head"](m["layer"](x)).pow(2).mean(1))  # [b, 2] before the layout

    check_low_memory(model, run, batch_dim)


class _TiedVocabulary(nn.Module):
    """A token embedding tied with the head (GPT-2's ``wte``), on a vocabulary of 40 rows and
    4 positions: the head's ``b T`` rows of the table (``40 × 6`` each) outweigh its output
    gradients (``4 × 40`` per row), so the low-memory step keeps the tied calls' rules and
    sums the Gramian over slices of the table."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = nn.Embedding(40, 6, padding_idx=0)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 40, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, tokens: Tensor) -> Tensor:  # [b, 4] → [b, 2]
        logits = self.head(torch.tanh(self.mix(self.wte(tokens))))
        per_position = logits.logsumexp(-1) - logits[..., 1]
        return torch.stack([per_position[:, :2].mean(1), per_position[:, 2:].mean(1)], 1)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("budget", [None, 0])
def test_tied_vocabulary_rules_kept_low_memory(
    layout: str, budget: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engine Gramian and ``.grad`` against the explicit Jacobian, the tied table's Gramian
    taken by slices (one table row at a time with a budget of 0) from the kept rules; with
    task losses (two rows) its rows weigh less than the head's output gradients and are
    summed as they come."""
    import jdoptim.autogram._held_rows as held_rows

    sliced: list[int] = []
    original = held_rows.tied_gramian

    def spied(param: Tensor, rules: list, budget_bytes: int) -> Tensor:
        sliced.append(len(rules))
        return original(param, rules, 0 if budget == 0 else budget_bytes)

    monkeypatch.setattr(held_rows, "tied_gramian", spied)
    torch.manual_seed(0)
    model = _TiedVocabulary().double()
    tokens = torch.randint(0, 40, (5, 4))
    tokens[:, -1] = 0  # padding
    pick, batch_dim = LAYOUTS[layout]
    losses_of = lambda m: pick(m(tokens))  # noqa: E731
    check_low_memory(model, losses_of, batch_dim)
    check_engine_low_memory(model, losses_of, batch_dim)
    if batch_dim is None:  # (one row per loss: the 2 rows of the table weigh less than D)
        assert not sliced, "the tied rows were summed as they came"
    else:
        assert sliced and set(sliced) == {2}, "the tied table's two calls were kept"
