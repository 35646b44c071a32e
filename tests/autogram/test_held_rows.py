"""Rows held from the Gramian to the update (``jdoptim/autogram/_held_rows.py``): the step's
Gramian and its weighted update equal the explicit Jacobian's, whatever part of the rows the
budget lets it hold, with tied, explicit, sparse and mixed-precision parameters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import jdoptim.autogram._step as step_module
from jdoptim.autogram import Engine
from jdoptim.autogram._held_rows import HeldRows, HeldRowsWriter, RowsBuffer

from ._oracle import explicit_jacobian


class TiedLM(nn.Module):
    """Embedding tied with the head, a LayerNorm, two Linear layers on 6 positions, and a free
    parameter used outside the layers' calls (the engine hooks the layers, not this module:
    the free parameter's rows come straight from autograd, one backward row per loss)."""

    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8, sparse=sparse)
        self.norm = nn.LayerNorm(8)
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 8)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.norm(self.embed(tokens)) * self.scale
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


def _model(sparse: bool = False, dtype: torch.dtype = torch.float64) -> TiedLM:
    torch.manual_seed(0)
    return TiedLM(sparse).to(dtype)


def _losses(model: nn.Module, per_sample: bool) -> Tensor:
    torch.manual_seed(1)
    tokens = torch.randint(0, 11, (4, 6))
    logits = model(tokens)
    per_position = logits.logsumexp(-1) - logits[..., 0]
    return per_position.mean(1) if per_sample else per_position.mean(0)[:3]


def _layers(model: nn.Module) -> list[nn.Module]:
    return list(model.children())


def _engine_results(model: nn.Module, per_sample: bool) -> tuple[Tensor, list[Tensor], HeldRows]:
    """The step's Gramian, its update for weights ``w = 1, 2, …`` and what it held."""
    params = list(model.parameters())
    if per_sample:  # (per-sample rows of a free parameter need a row per loss: see above)
        params.remove(model.scale)
    with Engine(_layers(model), batch_dim=0 if per_sample else None) as engine:
        losses = _losses(model, per_sample)
        step = engine.step(losses, params, [], per_sample=per_sample)
        with torch.no_grad():
            gramian = step.gramian()
            held = step.held
            weights = torch.arange(1.0, losses.numel() + 1, dtype=losses.dtype)
            grads, _ = step.gradients(weights)
    assert held is not None
    return gramian, grads, held


def _expected(model: nn.Module, per_sample: bool) -> tuple[Tensor, Tensor]:
    params = [p for p in model.parameters() if not (per_sample and p is model.scale)]
    losses = _losses(model, per_sample)
    jacobian = explicit_jacobian(losses, params).double()
    weights = torch.arange(1.0, losses.numel() + 1, dtype=torch.float64)
    return jacobian @ jacobian.T, weights @ jacobian


def _assert_exact(model: nn.Module, per_sample: bool) -> HeldRows:
    gramian, grads, held = _engine_results(model, per_sample)
    expected_gramian, expected_update = _expected(model, per_sample)
    update = torch.cat([g.to_dense().reshape(-1) for g in grads]).double()
    scale = expected_gramian.abs().max()
    assert (gramian.double() - expected_gramian).abs().max() / scale < 1e-12
    scale = expected_update.abs().max()
    assert (update - expected_update).abs().max() / scale < 1e-12
    return held


def _with_budget(monkeypatch: pytest.MonkeyPatch, budget: Callable[[int], int]) -> None:
    monkeypatch.setattr(step_module, "held_rows_budget", budget)


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "tasks"])
def test_rows_are_held_and_exact(per_sample: bool) -> None:
    """With the default budget every rows-forming parameter is held: the tied weight (summed
    over the lookup and the head), the free scale (task losses), the norm's affine, the Linear
    layers that take explicit rows."""
    model = _model()
    held = _assert_exact(model, per_sample)
    expected = {model.embed.weight, model.norm.weight, model.norm.bias}
    assert {id(p) for p in expected} <= held.ids
    assert (id(model.scale) in held.ids) is not per_sample


@pytest.mark.parametrize("per_sample", [True, False], ids=["per-sample", "tasks"])
@pytest.mark.parametrize("budget", [0, 700, 3000, 10**9])
def test_any_budget_gives_the_same_step(
    monkeypatch: pytest.MonkeyPatch, per_sample: bool, budget: int
) -> None:
    """Nothing held, part of the rows held (the rest through the rules, as before), all held:
    the same Gramian and update, each against the explicit Jacobian."""
    _with_budget(monkeypatch, lambda _: budget)
    held = _assert_exact(_model(), per_sample)
    held_bytes = 0 if held.matrix is None else held.matrix.numel() * held.matrix.element_size()
    assert held_bytes <= budget
    if budget == 0:
        assert not held.params and held.matrix is None
    if budget == 700:
        assert held.params, "a budget between nothing and everything holds some rows"


def test_a_sparse_tied_lookup_is_not_held() -> None:
    """A sparse Embedding tied with the head: its rows are not held (an update from them is
    dense, where a sparse table called twice keeps its sparse gradient); the step is exact."""
    model = _model(sparse=True)
    held = _assert_exact(model, per_sample=True)
    assert id(model.embed.weight) not in held.ids
    assert held.params  # (the other parameters' rows are held)


def test_a_sparse_lookup_called_twice_keeps_its_sparse_gradient() -> None:
    """The same sparse table on two inputs: its rows are summed over the calls for the
    Gramian, its update stays the rules' sparse one, equal to the explicit Jacobian's."""
    torch.manual_seed(0)
    table = nn.Embedding(9, 4, sparse=True).double()
    first, second = torch.randint(0, 9, (3, 5)), torch.randint(0, 9, (3, 5))

    def losses(lookup: nn.Module = table) -> Tensor:
        return (lookup(first) * lookup(second).tanh()).sum((1, 2))

    with Engine(table, batch_dim=0) as engine:
        step = engine.step(losses(), [table.weight], [], per_sample=True)
        with torch.no_grad():
            step.gramian()
            (grad,), _ = step.gradients(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    assert grad.layout is torch.sparse_coo
    dense = nn.Embedding(9, 4).double()  # (the oracle: the same table, dense gradients)
    dense.load_state_dict(table.state_dict())
    jacobian = explicit_jacobian(losses(dense), [dense.weight])
    expected = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) @ jacobian
    assert torch.allclose(grad.to_dense().reshape(-1), expected, atol=1e-12)


def test_rows_of_another_dtype_take_the_rules() -> None:
    """A float32 layer in a float64 model: its rows are not put beside the float64 ones (one
    matrix has one dtype); its Gramian comes from the rows it formed, its update from its rule."""
    model = _model()
    model.up.float()
    params = list(model.parameters())
    params.remove(model.scale)
    with Engine(_layers(model), batch_dim=0) as engine:
        tokens = torch.randint(0, 11, (4, 6))

        def forward() -> Tensor:
            h = model.norm(model.embed(tokens))
            h = h + model.down(torch.tanh(model.up(h.float())).double())
            logits = model.head(h)
            return (logits.logsumexp(-1) - logits[..., 0]).mean(1)

        losses = forward()
        step = engine.step(losses, params, [], per_sample=True)
        with torch.no_grad():
            gramian = step.gramian()
            held = step.held
            grads, _ = step.gradients(torch.ones(4, dtype=torch.float64))
    assert held is not None and held.params
    assert id(model.up.weight) not in held.ids
    jacobian = explicit_jacobian(forward(), params).double()
    scale = (jacobian @ jacobian.T).abs().max()
    assert (gramian.double() - jacobian @ jacobian.T).abs().max() / scale < 1e-6
    update = torch.cat([g.reshape(-1) for g in grads]).double()
    assert torch.allclose(update, jacobian.sum(0), rtol=1e-6, atol=1e-9)


def test_held_rows_split_one_product() -> None:
    """The writer and ``HeldRows`` by hand: rows of another dtype refused, ``R Rᵀ`` and
    ``wᵀ R`` split by parameter, against the rows themselves (non-contiguous rows included)."""
    torch.manual_seed(0)
    a, b, c = torch.zeros(2, 3), torch.zeros(5), torch.zeros(())
    rows_a, rows_b = torch.randn(4, 1, 3, 2).transpose(2, 3), torch.randn(4, 1, 5)
    writer = HeldRowsWriter(None, object(), count=4, width=12)
    assert writer.put(a, rows_a) is not None and writer.put(b, rows_b) is not None
    assert writer.put(c, torch.randn(4, 1, dtype=torch.float64)) is None  # another dtype
    held = writer.held()
    assert held.matrix is not None and held.matrix.shape == (4, 11)  # (narrowed to the filled)
    flat = torch.cat([rows_a.reshape(4, -1), rows_b.reshape(4, -1)], 1)
    gramian = held.gramian()
    assert gramian is not None and torch.allclose(gramian, flat @ flat.T)
    weights = torch.tensor([[1.0], [-2.0], [0.5], [3.0]])
    updates, (product,) = held.updates(weights)
    assert torch.allclose(updates[id(a)], torch.einsum("i,iab->ab", weights[:, 0], rows_a[:, 0]))
    assert torch.allclose(updates[id(b)], weights[:, 0] @ rows_b[:, 0])
    assert product is not None and all(u._base is product for u in updates.values())


class _Borrower:
    pass


def test_the_rows_buffer_is_lent_to_one_step_at_a_time() -> None:
    """The engine's matrix is reused once given back, or once its borrower is gone; while a
    step holds it, another gets a fresh matrix (never the same memory)."""
    buffer = RowsBuffer()
    like = torch.zeros(1)
    first, second = _Borrower(), _Borrower()
    kept = buffer.lend(first, 4, 10, like)
    other = buffer.lend(second, 4, 10, like)
    assert other.data_ptr() != kept.data_ptr()
    buffer.give_back(second)  # (not the borrower: changes nothing)
    assert buffer.lend(second, 2, 5, like).data_ptr() != kept.data_ptr()
    buffer.give_back(first)
    assert buffer.lend(second, 2, 5, like).data_ptr() == kept.data_ptr()
    del second
    third = _Borrower()
    assert buffer.lend(third, 4, 10, like).data_ptr() == kept.data_ptr()  # (borrower gone)
    buffer.give_back(third)
    assert buffer.lend(third, 4, 10, like.double()).data_ptr() != kept.data_ptr()  # (dtype)


def test_consecutive_steps_reuse_the_matrix_and_stay_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps on one engine: the second reuses the first's matrix once its update is computed,
    a step whose Gramian is taken while another's update is pending gets its own, and a
    step's update read twice takes the rules the second time: all equal to the oracle."""
    model = _model()
    params = [p for p in model.parameters() if p is not model.scale]
    expected_gramian, expected_update = _expected(model, per_sample=True)
    weights = torch.arange(1.0, 5.0, dtype=torch.float64)

    def check(gramian: Tensor, grads: list[Tensor]) -> None:
        update = torch.cat([g.reshape(-1) for g in grads])
        assert torch.allclose(gramian, expected_gramian, rtol=1e-12, atol=0)
        assert torch.allclose(update, expected_update, rtol=1e-12, atol=1e-14)

    with Engine(_layers(model), batch_dim=0) as engine:
        one = engine.step(_losses(model, True), params, [], per_sample=True)
        two = engine.step(_losses(model, True), params, [], per_sample=True)
        with torch.no_grad():
            g_one, g_two = one.gramian(), two.gramian()  # (both pending)
            first, second = _matrix_address(one), _matrix_address(two)
            assert first != second
            check(g_one, one.gradients(weights)[0])
            check(g_two, two.gradients(weights)[0])
            check(g_two, two.gradients(weights)[0])  # (read twice: from the rules)
        three = engine.step(_losses(model, True), params, [], per_sample=True)
        with torch.no_grad():
            g_three = three.gramian()
            assert _matrix_address(three) == first  # (given back by the first step)
            check(g_three, three.gradients(weights)[0])


def _matrix_address(step: object) -> int:
    held = getattr(step, "held", None)
    assert held is not None and held.matrix is not None
    return held.matrix.data_ptr()


def test_the_engine_reports_the_matrix_it_keeps() -> None:
    """``Engine.held_rows_bytes``: the held rows' size after a step (``bT`` rows of the held
    parameters, in the rows' dtype), none before and none in the low-memory mode."""
    model = _model()
    params = [p for p in model.parameters() if p is not model.scale]
    for low_memory in (False, True):
        with Engine(_layers(model), batch_dim=0, low_memory=low_memory) as engine:
            assert engine.held_rows_bytes == 0
            step = engine.step(_losses(model, True), params, [], per_sample=True)
            with torch.no_grad():
                step.gramian()
                held = step.held
                step.gradients(torch.ones(4, dtype=torch.float64))
            if low_memory:
                assert engine.held_rows_bytes == 0
            else:
                assert held is not None and held.params
                assert engine.held_rows_bytes == 4 * sum(p.numel() for p in held.params) * 8


def test_held_updates_become_grad_without_a_copy_and_stay_independent() -> None:
    """The held parameters' updates are disjoint views of one product ``wᵀ R``: ``JDOptimizer``
    stores them in ``.grad`` as they are (no copy), each equal to the explicit Jacobian's update
    with the step's weights, and an in-place change of one ``.grad`` leaves the others alone."""
    from jdoptim import JDOptimizer
    from jdoptim.aggregation import UPGrad

    model = _model()
    params = [p for p in model.parameters() if p is not model.scale]
    sgd = torch.optim.SGD(params, lr=0.0)
    opt = JDOptimizer(sgd, UPGrad(), modules=_layers(model), batch_dim=0)
    for _ in range(2):  # (the first step of a structure is the checked one)
        opt.zero_grad()
        record = opt.step(_losses(model, per_sample=True))
    assert record.weights is not None
    jacobian = explicit_jacobian(_losses(model, per_sample=True), params).double()
    expected = record.weights.double() @ jacobian
    stored = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert (stored - expected).abs().max() / expected.abs().max() < 1e-12
    held = [model.embed.weight, model.norm.weight, model.norm.bias]
    storages = {p.grad.untyped_storage().data_ptr() for p in held}
    assert len(storages) == 1, "the held updates share the one product's memory"
    assert all(p.grad.is_contiguous() for p in held)
    before = [p.grad.clone() for p in held]
    held[0].grad.zero_()
    held[1].grad.mul_(2.0)
    torch.testing.assert_close(held[1].grad, 2 * before[1])
    torch.testing.assert_close(held[2].grad, before[2])
    opt.zero_grad(set_to_none=False)  # (zeroes the views in place) then accumulates into them
    record = opt.step(_losses(model, per_sample=True))
    assert record.weights is not None
    expected = record.weights.double() @ jacobian
    stored = torch.cat([p.grad.reshape(-1) for p in params]).double()
    assert (stored - expected).abs().max() / expected.abs().max() < 1e-12


class TwiceLooked(nn.Module):
    """One embedding (with a padding index) looked up twice and tied with a head: its rows are
    summed over three calls in ``R``, two of them scattered in place."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(9, 5, padding_idx=0)
        self.mix = nn.Linear(5, 5)
        self.head = nn.Linear(5, 9, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.embed(tokens.flip(1)) * 0.5
        return self.head(torch.tanh(self.mix(h)))


def _assert_per_sample_step_exact(
    model: nn.Module, losses: Callable[[], Tensor], count: int, held: Tensor | None = None
) -> None:
    """One per-sample step of an engine on ``model``'s layers: its Gramian and its update for
    the weights ``1, 2, …, count`` against the explicit Jacobian of the same losses (relative
    ``1e-12``); with ``held``, that parameter's rows are held for the update."""
    params = list(model.parameters())
    with Engine(list(model.children()), batch_dim=0) as engine:
        step = engine.step(losses(), params, [], per_sample=True)
        with torch.no_grad():
            gramian = step.gramian()
            if held is not None:
                assert step.held is not None and id(held) in step.held.ids
            weights = torch.arange(1.0, count + 1, dtype=torch.float64)
            grads, _ = step.gradients(weights)
    jacobian = explicit_jacobian(losses(), params).double()
    expected = jacobian @ jacobian.T
    assert (gramian.double() - expected).abs().max() / expected.abs().max() < 1e-12
    update = torch.cat([g.reshape(-1) for g in grads]).double()
    expected_update = weights @ jacobian
    assert (update - expected_update).abs().max() / expected_update.abs().max() < 1e-12


@pytest.mark.parametrize("tasks", [1, 3], ids=["per-sample", "batch-tasks"])
def test_tied_rows_summed_in_place_over_three_calls(tasks: int) -> None:
    """Gramian and update against the explicit Jacobian of the same losses, per-sample and
    ``[batch, tasks]``, with padding positions (which get no rows)."""
    torch.manual_seed(0)
    model = TwiceLooked().double()
    tokens = torch.randint(0, 9, (4, 6))
    tokens[:, 0] = 0  # a padding position in every sample

    def losses() -> Tensor:
        logits = model(tokens)
        out = (logits.logsumexp(-1) - logits[..., 1]).reshape(4, tasks, -1).mean(-1)
        return out[:, 0] if tasks == 1 else out

    _assert_per_sample_step_exact(model, losses, 4 * tasks, held=model.embed.weight)


def test_the_kept_matrix_s_column_blocks_are_made_once_and_land_in_place() -> None:
    """Rows put through the engine's buffer land in their columns whatever their layout (a
    transposed one included), and a second step with the same layout gets the same block views
    (no new view operations); a fresh matrix (the buffer busy) and a replaced buffer do not
    reuse the kept blocks."""
    torch.manual_seed(0)
    buffer = RowsBuffer()
    a, b = torch.zeros(2, 3), torch.zeros(5)
    rows_a, rows_b = torch.randn(4, 1, 3, 2).transpose(2, 3), torch.randn(4, 1, 5)
    expected = torch.cat([rows_a.reshape(4, -1), rows_b.reshape(4, -1)], 1)
    seen = []
    for _ in range(2):
        borrower = _Borrower()
        writer = HeldRowsWriter(buffer, borrower, count=4, width=11)
        blocks = [writer.put(a, rows_a), writer.put(b, rows_b)]
        assert all(t is not None for t in blocks)
        held = writer.held()
        assert held.matrix is not None and torch.equal(held.matrix, expected)
        seen.append(blocks)
        buffer.give_back(borrower)
    assert all(x is y for x, y in zip(*seen))  # the same views, step after step
    holder = _Borrower()
    kept = buffer.lend(holder, 4, 11, rows_a)  # the buffer is busy: the next writer's is fresh
    writer = HeldRowsWriter(buffer, _Borrower(), count=4, width=11)
    fresh = writer.put(a, rows_a)
    assert fresh is not None and fresh.data_ptr() != kept.data_ptr()
    assert writer.held().matrix is not None and torch.equal(
        writer.held().matrix[:, :6], expected[:, :6]
    )
    buffer.give_back(holder)
    larger = HeldRowsWriter(buffer, _Borrower(), count=8, width=11)  # outgrows it: replaced
    assert larger.put(a, torch.randn(8, 1, 2, 3)) is not seen[0][0]


@pytest.mark.parametrize("unflatten", [True, False])
def test_split_as_gives_views_shaped_as_the_parameters(
    unflatten: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``split_as`` by torch's unflattening and by the split it falls back to: consecutive,
    contiguous views of the product, shaped as the parameters (as ``.grad`` takes them)."""
    import jdoptim.autogram._held_rows as held_rows

    if not unflatten:
        monkeypatch.setattr(held_rows, "_UNFLATTEN", None)
    params = [torch.zeros(2, 3), torch.zeros(()), torch.zeros(4)]
    product = torch.randn(1, 11)  # (a fresh tensor: no view of another)
    parts = held_rows.split_as(product[0], params)
    assert [t.shape for t in parts] == [p.shape for p in params]
    assert torch.equal(torch.cat([t.reshape(-1) for t in parts]), product[0])
    assert all(t._base is product and t.is_contiguous() for t in parts)


def test_the_rows_buffer_forgets_views_beyond_its_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch sizes that keep changing (a new ``[count, width]`` every step) do not grow the
    buffer's kept views without bound, and a matrix forgotten is made again, right."""
    import jdoptim.autogram._held_rows as held_rows

    monkeypatch.setattr(held_rows, "_MAX_MATRICES", 3)
    buffer, like = RowsBuffer(), torch.zeros(1)
    buffer.lend(_Borrower(), 10, 10, like)  # (the kept buffer: 100 entries)
    for count in range(1, 9):
        borrower = _Borrower()
        writer = HeldRowsWriter(buffer, borrower, count=count, width=10)
        rows = torch.randn(count, 1, 10)
        writer.put(torch.zeros(10), rows)
        held = writer.held()
        assert held.matrix is not None and torch.equal(held.matrix, rows[:, 0])
        assert held.matrix.data_ptr() == buffer._flat.data_ptr()  # (the kept buffer's)
        buffer.give_back(borrower)
        assert len(buffer._matrices) <= 3


class _TwiceProjected(nn.Module):
    """transformers' ``Conv1D`` (weight ``[in, out]``) called twice, and an ``nn.Linear``
    called twice: two tied weights whose slices are their first dimension's (input features
    for the one, output features for the other); a ``scale`` module re-run by the generic
    rule, called twice, whose rows are not sliced."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers.pytorch_utils")
        self.proj = transformers.Conv1D(7, 5)  # (nf=7, nx=5): weight [5, 7]
        self.mix = nn.Linear(7, 5)
        self.scale = _Scale()

    def forward(self, x: Tensor) -> Tensor:  # [b, s, 5]
        h = torch.tanh(self.proj(x))
        h = self.mix(h) + self.scale(self.mix(self.proj(torch.tanh(self.scale(x)))))
        return h.pow(2).mean(1)  # [b, 5]


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 5))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def _count_slices(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records each parameter slice whose rows the step forms (their first dimension's length)."""
    import jdoptim.autogram._held_rows as held_rows

    seen: list[int] = []
    original = held_rows._sliced_rows

    def counted(param: Tensor, rules: list, part: slice) -> Tensor | None:
        rows = original(param, rules, part)
        if rows is not None:
            seen.append(part.stop - part.start)
        return rows

    monkeypatch.setattr(held_rows, "_sliced_rows", counted)
    return seen


@pytest.mark.parametrize("tasks", [1, 3], ids=["per-sample", "batch-tasks"])
@pytest.mark.parametrize("budget", [0, 900])
@pytest.mark.parametrize("model_of", [TwiceLooked, _TwiceProjected], ids=["lookup", "conv1d"])
def test_tied_rows_over_the_budget_by_slices(
    monkeypatch: pytest.MonkeyPatch, tasks: int, budget: int, model_of: type[nn.Module]
) -> None:
    """A tied weight whose rows exceed the budget: its Gramian summed over slices of its first
    dimension (one table row at a time with a budget of 0), the other calls' rows added in
    place (the lookup's scattered); the generic rule's tied ``gain``, which does not slice,
    by its whole rows. Gramian and update against the explicit Jacobian."""
    _with_budget(monkeypatch, lambda _: budget)
    seen = _count_slices(monkeypatch)
    torch.manual_seed(0)
    model = model_of().double()
    if model_of is TwiceLooked:
        inputs = torch.randint(0, 9, (4, 6))
        inputs[:, 0] = 0  # padding
    else:
        inputs = torch.randn(4, 6, 5, dtype=torch.float64)

    def losses() -> Tensor:
        out = model(inputs)
        out = out.pow(2).mean(1) if out.dim() == 3 else out  # [4, 9 or 5]
        return out[:, :tasks] if tasks > 1 else out.sum(1)

    _assert_per_sample_step_exact(model, losses, 4 * tasks)
    assert len(seen) >= 2, "the tied weight's rows were taken in slices"
    if budget == 0:
        assert set(seen) == {1}
