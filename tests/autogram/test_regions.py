"""Parameters and calls shared by the samples, read per sample where the batch enters them.

A parent module that reads a child's parameter directly (DeBERTa's encoder reads
``rel_embeddings.weight``) and feeds it, through hooked calls of its own (a LayerNorm, each
layer's projections), to an expansion along the batch (``expand``, ``repeat``, a broadcasting
``matmul``) used to take the step with one backward row per loss, under an
``EngineRouteWarning``. The engine now reads each sample's gradient at the expansion and takes it
back through that shared region with one row per (task, sample) (:mod:`jdoptim.autogram._regions`).

Every check is against the explicit Jacobian of the same losses (float64, one ``autograd.grad``
per loss on the same graph), over three steps of one engine (the structure's checked first step,
then its remembered route); ``EngineRouteWarning`` is an error in this suite, so the fast route
is taken wherever no warning is expected.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

from jdoptim.autogram import Engine, EngineRouteWarning

from ._oracle import assert_gramian_close, explicit_jacobian
from ._same_losses import check_step, trainable


class _Queries(nn.Module):
    """Learned queries read directly by the parent (``self.table.weight``), normalised by a
    hooked LayerNorm, projected by a hooked Linear on ``[1, n, d]``, and given to the samples
    by ``how``: ``"expand"`` (``expand(b, n, d)``, as Perceiver's latents), ``"repeat"``
    (heads folded with the samples, ``repeat(b, 1, 1)``, as DeBERTa-v2), ``"matmul"`` (a
    broadcasting ``matmul`` of ``[1, heads, n, d/heads]`` against ``[b, heads, s, d/heads]``,
    which expands it, as DeBERTa's content-to-position scores) or
    ``"direct"`` (the table itself expanded, no call in between; the LayerNorm and the Linear
    then act on the samples' activations)."""

    def __init__(self, how: str, d: int = 4, n: int = 3, heads: int = 2) -> None:
        super().__init__()
        self.how, self.heads = how, heads
        self.table = nn.Embedding(n, d)
        self.norm = nn.LayerNorm(d)
        self.proj = nn.Linear(d, d)
        self.encode = nn.Linear(5, d)
        self.head = nn.Linear(d, 2)

    def forward(self, x: Tensor) -> Tensor:
        b, s, _ = x.shape
        h = torch.tanh(self.encode(x))  # [b, s, d]
        table = self.table.weight
        if self.how == "direct":
            h = self.proj(self.norm(h))  # (here per sample)
            q = table.expand(b, *table.shape)  # [b, n, d]
            scores = q @ h.transpose(1, 2)  # [b, n, s]
            return self.head((scores.softmax(-1) @ h).tanh()).sum(1)
        shared = self.proj(self.norm(table).unsqueeze(0))  # [1, n, d]
        d = shared.shape[-1]
        if self.how == "matmul":  # per head: matmul expands [1, heads, …] to [b, heads, …]
            hh = h.view(b, s, self.heads, -1).transpose(1, 2)  # [b, heads, s, d/heads]
            per_head = shared.view(1, -1, self.heads, d // self.heads).transpose(1, 2)
            scores = hh @ per_head.transpose(-1, -2)  # [b, heads, s, n]
            mixed = (scores.softmax(-1) @ per_head).transpose(1, 2).reshape(b, s, d)
            return self.head(mixed.tanh()).sum(1)
        if self.how == "expand":
            q = shared.expand(b, -1, -1)
            scores = q @ h.transpose(1, 2)
            return self.head((scores.softmax(-1) @ h).tanh()).sum(1)
        per_head = shared.view(1, -1, self.heads, d // self.heads).permute(0, 2, 1, 3)
        per_head = per_head.reshape(self.heads, -1, d // self.heads).repeat(b, 1, 1)
        hh = h.view(b, s, self.heads, -1).permute(0, 2, 1, 3).reshape(b * self.heads, s, -1)
        scores = hh @ per_head.transpose(1, 2)  # [b·heads, s, n]
        mixed = (scores.softmax(-1) @ per_head).reshape(b, self.heads, s, -1)
        return self.head(mixed.permute(0, 2, 1, 3).reshape(b, s, d).tanh()).sum(1)


def _in_layout(model: Callable[[Tensor], Tensor], inputs: Tensor, layout: str):
    """The losses of ``model(inputs)`` (``[b, 2]``) in ``layout``: per-sample (the first
    column), ``[batch, tasks]`` or task losses (the batch means)."""

    def losses() -> Tensor:
        out = model(inputs)
        if layout == "per-sample":
            return out[:, 0]
        return out if layout == "batch-tasks" else out.mean(0)

    return losses


def _losses(model: nn.Module, layout: str):
    squared = lambda x: model(x).pow(2)  # noqa: E731
    return _in_layout(squared, torch.randn(3, 4, 5, dtype=torch.float64), layout)


def _check_engine_steps(
    model: nn.Module, losses_of, batch_dim: int | None, steps: int = 3, low_memory: bool = False
) -> list:
    """``steps`` steps of one Engine, each Gramian against ``J Jᵀ`` of the same losses; returns
    each step's state (:class:`~jdoptim.autogram._step.GramianStep`)."""
    params = trainable(model)
    taken = []
    with Engine(model, batch_dim=batch_dim, low_memory=low_memory) as engine:
        for _ in range(steps):
            losses = losses_of()
            jacobian = explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=batch_dim is not None)
            with torch.no_grad():
                gramian = step.gramian()
            if low_memory:
                step.release_graph(losses)
            assert_gramian_close(gramian, jacobian @ jacobian.T, rtol=1e-12)  # ([m, m])
            taken.append(step)
    return taken


@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
@pytest.mark.parametrize("how", ["expand", "repeat", "matmul", "direct"])
def test_a_shared_region_is_read_per_sample(how: str, layout: str) -> None:
    torch.manual_seed(0)
    model = _Queries(how).double()
    steps = _check_engine_steps(model, _losses(model, layout), batch_dim=0)
    for step in steps:  # one per-sample backward, the table's rows from the region
        assert step.batch_dim == 0 and step.b == 3 and step.explicit == []
        assert step.region_params == [model.table.weight]
    check_step(model, _losses(model, layout), batch_dim=0, rtol=1e-10)


@pytest.mark.parametrize("how", ["expand", "repeat", "matmul"])
def test_task_losses_stay_exact(how: str) -> None:
    torch.manual_seed(0)
    model = _Queries(how).double()
    _check_engine_steps(model, _losses(model, "tasks"), batch_dim=None)
    check_step(model, _losses(model, "tasks"), batch_dim=None, rtol=1e-10)


@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
@pytest.mark.parametrize("how", ["expand", "repeat", "matmul", "direct"])
def test_the_low_memory_step_reads_regions_too(how: str, layout: str) -> None:
    torch.manual_seed(0)
    model = _Queries(how).double()
    losses = _losses(model, layout)
    steps = _check_engine_steps(model, losses, batch_dim=0, low_memory=True)
    assert all(step.b == 3 and step.region_params == [model.table.weight] for step in steps)
    check_step(model, losses, batch_dim=0, rtol=1e-10, low_memory=True)


class _AlsoBatched(_Queries):
    """The table also added to the activations directly (its gradient there is only the sum
    over the samples): the losses reach it other than through the expansion."""

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        return out + (self.encode(x) * self.table.weight[0]).sum((1, 2))[:, None]


def test_a_region_also_reached_otherwise_takes_rows_per_loss() -> None:
    torch.manual_seed(0)
    model = _AlsoBatched("expand").double()
    with pytest.warns(EngineRouteWarning, match="table.weight"):
        steps = _check_engine_steps(model, _losses(model, "per-sample"), batch_dim=0)
    assert steps[0].batch_dim is None and steps[0].regions is None


class _RepeatedBatch(nn.Module):
    """A batched tensor repeated along the batch, ``h.repeat(2, 1)``: at ``b = 2`` its shapes
    are those of an expansion along the batch, but sample ``i``'s losses read rows ``i`` and
    ``i + 2``; and a table read directly, so that the engine looks for regions."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(5, 4)
        self.table = nn.Embedding(1, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.encode(x)) * self.table.weight  # [b, 4]
        twice = h.repeat(2, 1)  # [2b, 4]
        return (twice.unflatten(0, (2, -1)) ** 2).sum((0, 2))  # [b], a mix of rows i, i + b


class _Latents(nn.Module):
    """A layer whose call takes the batch size as an ``int`` and returns its parameter expanded
    to it (Perceiver's latents and trainable position encodings): no tensor argument holds the
    samples, so the generic rule takes the whole call, each sample's rows from its own part of
    the output gradient."""

    def __init__(self, n: int = 3, d: int = 4) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n, d))

    def forward(self, batch_size: int) -> Tensor:
        return self.latents.expand(batch_size, -1, -1)


class _Perceiving(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.queries = _Latents()
        self.encode = nn.Linear(5, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.encode(x))  # [b, s, 4]
        q = self.queries(x.shape[0])  # [b, 3, 4]
        attended = (q @ h.transpose(1, 2)).softmax(-1) @ h
        return self.head(attended.tanh()).sum(1)


@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks", "tasks"])
def test_a_parameter_expanded_to_an_int_batch_size_in_a_call(layout: str) -> None:
    torch.manual_seed(0)
    model = _Perceiving().double()
    batch_dim = None if layout == "tasks" else 0
    steps = _check_engine_steps(model, _losses(model, layout), batch_dim=batch_dim)
    if batch_dim is not None:  # one per-sample backward (no warning: they are errors here)
        assert all(step.b == 3 and step.explicit == [] for step in steps)
    check_step(model, _losses(model, layout), batch_dim=batch_dim, rtol=1e-10)


class _ReadHead(nn.Module):
    """Logits against a table read directly in the forward, ``F.linear(h, table.weight)``:
    ``"tied"``, the token embedding's own table (a tied head written as OLMo writes it, the
    table used by the embedding's call too); ``"prototypes"``, a table no call uses (class
    prototypes); ``"last"``, the tied head on the last position only (``[b, d]`` rows)."""

    def __init__(self, how: str, vocab: int = 11, d: int = 6) -> None:
        super().__init__()
        self.how = how
        self.wte = nn.Embedding(vocab, d)
        self.protos = nn.Embedding(vocab, d) if how == "prototypes" else None
        self.mix = nn.Linear(d, d)

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.mix(self.wte(tokens)))  # [b, s, d]
        if self.how == "last":
            h = h[:, -1]  # [b, d]
        table = self.wte.weight if self.protos is None else self.protos.weight
        logits = nn.functional.linear(h, table)
        logits = logits if logits.dim() == 3 else logits[:, None]
        return torch.stack([logits.logsumexp(-1).mean(1), logits[..., 0].pow(2).mean(1)], 1)


def _read_head_losses(model: nn.Module, layout: str):
    return _in_layout(model, torch.randint(0, 11, (3, 5)), layout)


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
@pytest.mark.parametrize("how", ["tied", "prototypes", "last"])
def test_a_table_read_by_a_product_is_read_per_sample(
    how: str, layout: str, low_memory: bool
) -> None:
    """Each sample's gradient of the table is ``Σ_rows hᵀ D`` over its rows of the product;
    a tied table's rows are summed with its embedding call's."""
    torch.manual_seed(0)
    model = _ReadHead(how).double()
    losses = _read_head_losses(model, layout)
    steps = _check_engine_steps(model, losses, batch_dim=0, low_memory=low_memory)
    table = model.wte.weight if model.protos is None else model.protos.weight
    assert all(step.b == 3 and step.region_params == [table] for step in steps)
    check_step(model, losses, batch_dim=0, rtol=1e-10, low_memory=low_memory)


def test_a_table_read_by_a_product_with_task_losses() -> None:
    torch.manual_seed(0)
    model = _ReadHead("tied").double()
    _check_engine_steps(model, _read_head_losses(model, "tasks"), batch_dim=None)
    check_step(model, _read_head_losses(model, "tasks"), batch_dim=None, rtol=1e-10)


class _FeatureRows(nn.Module):
    """A product whose rows are not the samples', ``x.T @ table`` (``[4, b]`` rows at
    ``b = 2``, a multiple of ``b``), with a table read directly: its shapes are those of a
    contraction, but the rows are the features."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(5, 4)
        self.table = nn.Embedding(2, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.encode(x))  # [2, 4]
        mixed = h.T @ self.table.weight  # [4, 3]
        return (h * mixed.sum(1)).pow(2).sum(1)  # [2]


@pytest.mark.parametrize("kind", [_RepeatedBatch, _FeatureRows], ids=["repeat", "product"])
def test_a_size_coincidence_is_caught_by_the_check(kind: type[nn.Module]) -> None:
    """The check compares the regions' reading with autograd's, fails, and the structure is
    taken without regions (the table, read directly, then needs one row per loss)."""
    torch.manual_seed(0)
    model = kind().double()
    x = torch.randn(2, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EngineRouteWarning)
        steps = _check_engine_steps(model, lambda: model(x), batch_dim=0)
    assert steps[0].regions is None


class _Masked(nn.Module):
    """A layer with a parameter of its own (re-run by the generic rule) that takes a ``[s, s]``
    mask: at ``s = b`` the mask looks like a per-sample input, so the re-run one sample at a
    time computes other values (the column sums of one row), which the check sees, and the
    engine re-runs it on the whole batch."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return torch.tanh((h @ self.weight) * mask.sum(0)[:, None])  # weighs positions


class _QueriesAndMask(_Queries):
    def __init__(self) -> None:
        super().__init__("repeat")
        self.masked = _Masked()

    def forward(self, x: Tensor) -> Tensor:
        s = x.shape[1]
        mask = torch.ones(s, s, dtype=x.dtype).tril() / s
        return super().forward(x) + self.masked(x[..., :4], mask).sum((1, 2))[:, None]


def test_another_modules_failure_keeps_the_regions() -> None:
    """The check fails the masked layer only (a re-run per sample, not the regions): the step
    stays per sample with its regions read, that layer re-run on the whole batch (warned)."""
    torch.manual_seed(0)
    model = _QueriesAndMask().double()
    x = torch.randn(4, 4, 5, dtype=torch.float64)  # (s = b = 4)
    with pytest.warns(EngineRouteWarning, match="masked"):
        steps = _check_engine_steps(model, lambda: model(x)[:, 0], batch_dim=0)
    assert all(step.b == 4 and step.region_params == [model.table.weight] for step in steps)


class _ComputedClasses(nn.Module):
    """Logits against class embeddings computed by hooked layers from fixed class features
    (the text side of CLIP-style zero-shot heads and prompt learning: ``[C, d]``, shared by the
    samples), ``image @ classes.T``: the product reads the classes' side as a region."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.image = nn.Linear(7, 6)
        self.text = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6))
        self.register_buffer("prompts", torch.randn(classes, 4))

    def forward(self, x: Tensor) -> Tensor:
        classes = self.text(self.get_buffer("prompts"))  # [C, 6]
        logits = torch.tanh(self.image(x)) @ classes.T  # [b, C]
        return torch.stack([logits.logsumexp(-1), logits[:, 0].pow(2)], 1)


@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
@pytest.mark.parametrize("layout", ["per-sample", "batch-tasks"])
def test_classes_computed_by_layers_are_a_region(layout: str, low_memory: bool) -> None:
    torch.manual_seed(0)
    model = _ComputedClasses().double()
    losses = _in_layout(model, torch.randn(3, 7, dtype=torch.float64), layout)
    steps = _check_engine_steps(model, losses, batch_dim=0, low_memory=low_memory)
    for step in steps:  # the text layers' calls: in the region, read per sample
        assert step.b == 3 and step.regions is not None and len(step.regions.records) == 2
    check_step(model, losses, batch_dim=0, rtol=1e-10, low_memory=low_memory)
