"""Calls shared by the samples in per-sample mode: a position embedding ``wpe(arange(s)[None])``
of shape ``[1, s, d]`` (GPT-2's and BERT's layout) is expanded along the batch by the engine's
hook once a step has seen it consumed by ``tok + pos`` only, so that later steps stay on the
per-sample path (one backward pass, ``step.b`` = the batch size) with no ``EngineRouteWarning``
(``setup.cfg`` makes that warning an error). Every step's Gramian and ``JDOptimizer``'s ``.grad``
equal the explicit per-sample Jacobian of the same losses, float64. nanoGPT's ``[t, d]``, broadcast
along a new leading dimension, is expanded to ``[b, t, d]`` the same way."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import UPGrad
from jdoptim.autogram import Engine, EngineRouteWarning

from ._oracle import assert_gramian_close, explicit_jacobian


class _Positions(nn.Module):
    """``head(tanh(mix(wte(idx) + wpe(positions))))`` with positions ``[1, s]`` or ``[s]``."""

    def __init__(self, s: int, leading_one: bool, op: str = "add") -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(11, 6), nn.Embedding(s, 6)
        self.mix, self.head = nn.Linear(6, 6), nn.Linear(6, 11, bias=False)
        self.leading_one, self.op = leading_one, op

    def forward(self, idx: Tensor) -> Tensor:
        positions = torch.arange(idx.shape[1])
        pos = self.wpe(positions[None] if self.leading_one else positions)
        tok = self.wte(idx)
        x = tok + pos if self.op == "add" else tok * pos if self.op == "mul" else pos + tok
        return self.head(torch.tanh(self.mix(x)))


def _losses(model: nn.Module, idx: Tensor) -> Tensor:
    return model(idx).pow(2).sum((1, 2))


def _steps(model: nn.Module, batches: list[Tensor], low_memory: bool = False) -> list[int]:
    """Engine steps on the batches; each Gramian against the explicit Jacobian; the steps' b."""
    params = list(model.parameters())
    seen = []
    with Engine(model, batch_dim=0, low_memory=low_memory) as engine:
        for idx in batches:
            losses = _losses(model, idx)
            jacobian = explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=True)
            with torch.no_grad():
                gramian = step.gramian()
            assert_gramian_close(gramian, jacobian @ jacobian.T, rtol=1e-12)
            seen.append(step.b)
    return seen


@pytest.mark.parametrize("batch,s", [(4, 4), (3, 5), (5, 3)], ids=["s=b", "s>b", "s<b"])
@pytest.mark.parametrize("op", ["add", "mul", "radd"])
@pytest.mark.parametrize("low_memory", [False, True], ids=["default", "low-memory"])
def test_leading_one_position_embedding_takes_the_per_sample_path(
    batch: int, s: int, op: str, low_memory: bool
) -> None:
    torch.manual_seed(0)
    model = _Positions(s, leading_one=True, op=op).double()
    batches = [torch.randint(0, 11, (batch, s)) for _ in range(3)]
    batches.append(torch.randint(0, 11, (batch - 1, s)))  # a smaller last batch
    # The first step sees the call unexpanded: given to the samples by additions, it is read
    # there (per-sample); by a product, the step takes exact rows per loss (b = 1, no warning).
    # The next ones are per-sample (expanded), whatever the batch size; the low-memory step
    # takes the same routes.
    first = 1 if op == "mul" else batch
    assert _steps(model, batches, low_memory) == [first, batch, batch, batch - 1]


def test_leading_one_jdoptimizer_grad() -> None:
    torch.manual_seed(0)
    model = _Positions(4, leading_one=True).double()
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=0)
    try:
        for _ in range(3):
            idx = torch.randint(0, 11, (4, 4))
            losses = _losses(model, idx)
            jacobian = explicit_jacobian(losses, params)
            weights = UPGrad().weighting(jacobian @ jacobian.T)
            opt.zero_grad()
            opt.step(losses)
            actual = torch.cat([p.grad.reshape(-1) for p in params])
            torch.testing.assert_close(actual, weights @ jacobian, rtol=1e-10, atol=1e-12)
    finally:
        opt._update_computer.engine.close()  # type: ignore[attr-defined]


def test_output_unchanged_by_the_expansion() -> None:
    """The model's output with the engine expanding ``wpe`` is the output without the engine."""
    torch.manual_seed(0)
    model = _Positions(5, leading_one=True).double()
    idx = torch.randint(0, 11, (3, 5))
    plain = model(idx).detach()
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            out = model(idx)
            assert torch.equal(out, plain) and out.shape == plain.shape
            engine.compute_gramian(out.pow(2).sum((1, 2)))


class _Summed(nn.Module):
    """``wpe``'s ``[1, s, d]`` output reduced over dimension 0 (``pos.sum(0)``) in the forward:
    expanding it would change the values, so it is never expanded."""

    def __init__(self) -> None:
        super().__init__()
        self.wpe, self.lin = nn.Embedding(4, 3), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x + self.wpe(torch.arange(4)[None]).sum(0))


def test_a_consumer_that_does_not_broadcast_keeps_the_row_route() -> None:
    torch.manual_seed(0)
    model = _Summed().double()
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    plain = model(x).detach()
    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        for k in range(2):
            out = model(x)
            assert torch.equal(out, plain)
            losses = out.pow(2).sum((1, 2))
            jacobian = explicit_jacobian(losses, params)
            if k == 0:
                with pytest.warns(EngineRouteWarning, match="'wpe'"):
                    step = engine.step(losses, params, [], per_sample=True)
            else:
                step = engine.step(losses, params, [], per_sample=True)
            assert step.b == 1
            with torch.no_grad():
                assert_gramian_close(step.gramian(), jacobian @ jacobian.T, rtol=1e-12)


@pytest.mark.parametrize("op", ["add", "mul"])
@pytest.mark.parametrize("batch,t", [(4, 4), (3, 5)], ids=["t=b", "t!=b"])
def test_nanogpt_layout_takes_the_per_sample_path(batch: int, t: int, op: str) -> None:
    """``[t, d]`` (nanoGPT), broadcast by ``tok + pos`` along a new leading dimension: expanded
    to ``[b, t, d]`` from the second step on, also when ``t`` equals the batch size (where the
    output's shape alone would pass for per-sample)."""
    torch.manual_seed(0)
    model = _Positions(t, leading_one=False, op=op).double()
    batches = [torch.randint(0, 11, (batch, t)) for _ in range(3)]
    # (the first step reads an added ``[t, d]`` at its additions, unsqueezed: per-sample too)
    assert _steps(model, batches) == [1 if op == "mul" else batch, batch, batch]


def test_nanogpt_layout_jdoptimizer_grad_and_output() -> None:
    torch.manual_seed(0)
    model = _Positions(4, leading_one=False).double()
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=0)
    idx = torch.randint(0, 11, (4, 4))
    plain = model(idx).detach()
    try:
        for _ in range(3):
            out = model(idx)
            assert torch.equal(out, plain)
            losses = out.pow(2).sum((1, 2))
            jacobian = explicit_jacobian(losses, params)
            weights = UPGrad().weighting(jacobian @ jacobian.T)
            opt.zero_grad()
            opt.step(losses)
            actual = torch.cat([p.grad.reshape(-1) for p in params])
            torch.testing.assert_close(actual, weights @ jacobian, rtol=1e-10, atol=1e-12)
    finally:
        opt._update_computer.engine.close()  # type: ignore[attr-defined]


class _Switching(nn.Module):
    """``tok + pos`` at first, then ``pos.sum(0)`` (which an expansion would change)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe, self.lin = nn.Embedding(11, 3), nn.Embedding(4, 3), nn.Linear(3, 1)
        self.summed = False

    def forward(self, idx: Tensor) -> Tensor:
        pos = self.wpe(torch.arange(4))
        x = self.wte(idx) + (pos.sum(0) if self.summed else pos)
        return self.lin(x).pow(2).sum((1, 2))


def test_expanded_output_used_otherwise_is_refused_then_not_expanded() -> None:
    torch.manual_seed(0)
    model = _Switching().double()
    idx = torch.randint(0, 11, (3, 4))
    params = list(model.parameters())
    with Engine(model, batch_dim=0) as engine:
        for _ in range(2):
            engine.step(model(idx), params, [], per_sample=True)
        model.summed = True
        before = [p.detach().clone() for p in params]
        with pytest.raises(RuntimeError, match=r"'wpe'.*no longer expanded"):
            engine.step(model(idx), params, [], per_sample=True)
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        losses = model(idx)  # not expanded: the model's own values, exact rows per loss
        plain = _Switching().double()
        plain.load_state_dict(model.state_dict())
        plain.summed = True
        torch.testing.assert_close(losses, plain(idx), rtol=0, atol=0)
        jacobian = explicit_jacobian(losses, params)
        step = engine.step(losses, params, [], per_sample=True)  # (the error said so: no warning)
        assert step.b == 1
        with torch.no_grad():
            assert_gramian_close(step.gramian(), jacobian @ jacobian.T, rtol=1e-12)


class _LearnedPositions(nn.Module):
    """A layer without a rule (the generic rule re-runs it) that returns ``[t, d]`` or
    ``[1, t, d]`` from its own parameter, with dropout: shared by the samples."""

    def __init__(self, t: int, leading_one: bool) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(t, 6))
        self.leading_one = leading_one

    def forward(self, t: int) -> Tensor:
        out = torch.nn.functional.dropout(self.table[:t].tanh(), 0.3, self.training)
        return out[None] if self.leading_one else out


class _WithLearnedPositions(nn.Module):
    def __init__(self, t: int, leading_one: bool) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(11, 6), _LearnedPositions(t, leading_one)
        self.head = nn.Linear(6, 11)

    def forward(self, idx: Tensor) -> Tensor:
        return self.head(torch.tanh(self.wte(idx) + self.wpe(idx.shape[1])))


@pytest.mark.parametrize("leading_one", [False, True], ids=["td", "1td"])
@pytest.mark.parametrize("batch,t", [(4, 4), (3, 5)], ids=["t=b", "t!=b"])
def test_shared_call_of_a_re_run_module(batch: int, t: int, leading_one: bool) -> None:
    """The generic rule differentiates an expanded call by re-running it as it was made (its
    dropout mask included), with each sample's output gradient: per-sample and exact."""
    torch.manual_seed(0)
    model = _WithLearnedPositions(t, leading_one).double().train()
    batches = [torch.randint(0, 11, (batch, t)) for _ in range(3)]
    assert _steps(model, batches) == [batch, batch, batch]


@pytest.mark.parametrize("model_of", [_Positions, _WithLearnedPositions], ids=["rule", "generic"])
@pytest.mark.parametrize("leading_one", [False, True], ids=["td", "1td"])
def test_expanded_calls_with_task_losses_and_task_matrices(model_of, leading_one: bool) -> None:
    """Once expanded, the calls are exact for ``[batch, tasks]`` losses and for task losses (the
    batch means, ``per_sample=False``) too."""
    torch.manual_seed(0)
    model = model_of(4, leading_one).double().train()
    params = list(model.parameters())
    idx = torch.randint(0, 11, (3, 4))
    with Engine(model, batch_dim=0) as engine:
        engine.step(_losses(model, idx), params, [], per_sample=True)  # learns the expansion
        for per_sample in (True, False):
            out = model(idx).pow(2)
            matrix = torch.stack([out.sum((1, 2)), out[:, 0].sum(-1)], dim=1)  # [b, 2]
            losses = matrix if per_sample else matrix.mean(0)
            jacobian = explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=per_sample)
            with torch.no_grad():
                gramian = step.gramian()
            assert_gramian_close(gramian, jacobian @ jacobian.T, rtol=1e-12)
            assert step.b == (3 if per_sample else 1)


@pytest.mark.parametrize("model_of", [_Positions, _WithLearnedPositions], ids=["rule", "generic"])
@pytest.mark.parametrize("leading_one", [False, True], ids=["td", "1td"])
@pytest.mark.parametrize("second_per_sample", [True, False], ids=["per-sample", "tasks"])
def test_two_engines_on_one_model(model_of, leading_one: bool, second_per_sample: bool) -> None:
    """Two engines on one model (a ``JDOptimizer`` and an engine that monitors the Gramian):
    once the first expands a shared call, the second engine's hook receives the expanded output
    in place of the call's, and records the call with its inputs expanded as the first did, so
    that its rule reads inputs of the output's shape (DistilBERT's position embedding used to
    raise a bare reshape error there). Every step of both is exact, float64."""
    torch.manual_seed(0)
    model = model_of(4, leading_one).double().train()
    params = list(model.parameters())
    with (
        Engine(model, batch_dim=0) as first,
        Engine(model, batch_dim=0 if second_per_sample else None) as second,
    ):
        for _ in range(3):
            out = model(torch.randint(0, 11, (3, 4))).pow(2).sum((1, 2))
            for engine, per_sample in ((first, True), (second, second_per_sample)):
                losses = out if per_sample else torch.stack([out[:2].sum(), out[1:].sum()])
                jacobian = explicit_jacobian(losses, params)
                step = engine.step(losses, params, [], per_sample=per_sample, retain_graph=True)
                with torch.no_grad():
                    gramian = step.gramian()
                assert_gramian_close(gramian, jacobian @ jacobian.T, rtol=1e-12)
        assert step.b == (3 if second_per_sample else 1)


def test_jdoptimizer_refusal_changes_nothing() -> None:
    """The refusal of an expanded output used otherwise reaches ``JDOptimizer.step`` before any
    change: parameters, ``.grad`` and the optimizer's state are as they were."""
    torch.manual_seed(0)
    model = _Switching().double()
    params = list(model.parameters())
    adam = torch.optim.Adam(params, lr=0.1)
    opt = JDOptimizer(adam, UPGrad(), modules=model, batch_dim=0)
    idx = torch.randint(0, 11, (3, 4))
    try:
        for _ in range(2):
            opt.zero_grad()
            opt.step(model(idx))
        model.summed = True
        before = [p.detach().clone() for p in params]
        grads = [p.grad.clone() for p in params]
        steps = [adam.state[p]["step"].clone() for p in params]
        with pytest.raises(RuntimeError, match=r"'wpe'"):
            opt.step(model(idx))
        assert all(torch.equal(a, p) for a, p in zip(before, params))
        assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))
        assert all(torch.equal(s, adam.state[p]["step"]) for s, p in zip(steps, params))
    finally:
        opt._update_computer.engine.close()  # type: ignore[attr-defined]


# -- a shared output added to folded activations (Swin's relative position bias) --------------


class _WindowBias(nn.Module):
    """A learned bias ``[1, heads, n, n]`` computed from a table, shared by every window."""

    def __init__(self, heads: int, n: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads) * 0.5)
        index = torch.arange(n)[:, None] - torch.arange(n)[None, :] + n - 1
        self.register_buffer("index", index)

    def forward(self) -> Tensor:
        return self.table[self.index].permute(2, 0, 1).unsqueeze(0)  # [1, heads, n, n]


class _Windows(nn.Module):
    """Attention inside windows of ``n`` tokens: the ``[b, w·n, d]`` tokens are folded into
    ``[b·w, n, d]`` (sample-major; ``sequence_first`` folds them window-major instead) and the
    shared bias is added to the scores (``alpha``: ``torch.add``'s multiplier)."""

    def __init__(self, sequence_first: bool = False, alpha: float = 1.0, masked: bool = False):
        super().__init__()
        self.n, self.heads, self.sequence_first, self.alpha = 3, 2, sequence_first, alpha
        self.masked = masked  # Swin's shifted windows: bias + a constant [b·w, 1, n, n] mask
        self.qk = nn.Linear(4, 2 * self.heads * 2)
        self.bias = _WindowBias(self.heads, self.n)
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:  # x: [b, w·n, 4]
        b, length, d = x.shape
        w = length // self.n
        if self.sequence_first:
            windows = x.view(b, w, self.n, d).transpose(0, 1).reshape(w * b, self.n, d)
        else:
            windows = x.reshape(b * w, self.n, d)
        q, k = self.qk(windows).view(b * w, self.n, 2, self.heads, 2).unbind(2)
        scores = torch.einsum("wihc,wjhc->whij", q, k)  # [b·w, heads, n, n]
        bias = self.bias()
        if self.masked:
            mask = torch.zeros(b * w, 1, self.n, self.n, dtype=x.dtype)
            mask[1::2, :, 0, 1:] = -100.0  # every second window hides some keys from one query
            bias = bias + mask  # [b·w, heads, n, n]: the sum is read, as for the scores
        scores = torch.add(scores, bias, alpha=self.alpha)
        mixed = torch.einsum("whij,wjd->wid", scores.softmax(-1), windows)  # [b·w, n, 4]
        if self.sequence_first:
            mixed = mixed.view(w, b, self.n, d).transpose(0, 1)
        return self.head(mixed.reshape(b, length, d)).squeeze(-1).pow(2).mean(1)  # [b]


def _per_sample_steps(model: nn.Module, shape: tuple[int, ...], steps: int = 3) -> list[int]:
    """``b`` of each engine step on inputs of ``shape`` (new ones each step), each Gramian
    checked against the explicit Jacobian."""
    torch.manual_seed(1)
    params = list(model.parameters())
    found = []
    with Engine(model, batch_dim=0) as engine:
        for _ in range(steps):
            losses = model(torch.randn(shape, dtype=torch.float64))
            jacobian = explicit_jacobian(losses, params)
            step = engine.step(losses, params, [], per_sample=True)
            with torch.no_grad():
                assert_gramian_close(step.gramian(), jacobian @ jacobian.T, rtol=1e-10)
            found.append(step.b)
    return found


def _window_steps(model: nn.Module) -> list[int]:
    return _per_sample_steps(model, (4, 6, 4))  # 4 samples, 2 windows of 3 tokens


@pytest.mark.parametrize("masked", [False, True], ids=["scores", "mask"])
def test_shared_bias_read_at_additions_windows_takes_the_per_sample_path(masked: bool) -> None:
    """The bias's per-sample gradient is read at its addition to the ``[b·w, …]`` scores, or to
    a constant mask of that many windows (each sample's windows summed), from the first step on
    (nothing in the forward changes): per-sample steps, exact, no warning."""
    torch.manual_seed(0)
    model = _Windows(masked=masked).double()
    assert _window_steps(model) == [4, 4, 4]  # (warnings are errors here)


@pytest.mark.parametrize(
    "model", [_Windows(sequence_first=True), _Windows(alpha=2.0)], ids=["window-major", "alpha"]
)
def test_shared_bias_added_otherwise_stays_exact(model: nn.Module) -> None:
    """Windows folded window-major (the sample-major reading is wrong, which the engine's check
    sees) or a scaled addition (not read at all): exact by one backward row per loss, warned."""
    torch.manual_seed(0)
    with pytest.warns(EngineRouteWarning):
        assert _window_steps(model.double()) == [1, 1, 1]


# -- a shared output reaching the samples through shape operations (T5's relative bias) --------


class _RelativeAttention(nn.Module):
    """Two attention layers sharing one relative position bias, as T5 computes it: an embedding
    of bucket indices ``[q, k]`` (from ``arange``, not from the batch) gives ``[q, k, heads]``,
    permuted and unsqueezed to ``[1, heads, q, k]``, then given to every layer's ``[b, heads, q,
    k]`` scores by

    * ``"eager"``: an addition to the scores;
    * ``"sdpa"``: a ``clone`` and an addition to the padding mask ``[b, 1, 1, k]``, used as
      ``scaled_dot_product_attention``'s ``attn_mask``;
    * ``"causal"``: a ``where`` with the causal mask, then as ``"sdpa"``;
    * ``"expanded"``: expanded along the batch and copied (``contiguous``), then added to the
      scores, as MPNet does;
    * ``"expanded_scaled"``: the same copy multiplied before the addition (not read at the
      additions: the expansion is, as a sample-shared region's, see ``test_regions.py``);
    * ``"scaled"``: ``2 * bias`` first (not a shape operation: not read at the additions);
    * ``"batched_where"``: a ``where`` whose condition has the batch (the broadcast happens there:
      not followed)."""

    def __init__(self, mode: str, heads: int = 2, buckets: int = 5) -> None:
        super().__init__()
        self.mode, self.heads = mode, heads
        self.bias = nn.Embedding(buckets, heads)
        self.qkv = nn.ModuleList([nn.Linear(4, 3 * 4) for _ in range(2)])
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:  # x: [b, s, 4]
        b, s, _ = x.shape
        relative = torch.arange(s)[None, :] - torch.arange(s)[:, None]
        buckets = relative.clamp(-2, 2) + 2  # [q, k]
        bias = self.bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, q, k]
        padding = torch.zeros(b, 1, 1, s, dtype=x.dtype)
        padding[0, :, :, -1] = -50.0  # sample 0's last token is padding
        if self.mode == "causal":
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            bias = torch.where(causal, bias, 0.0)  # (0, not -inf: the masked entries matter)
        if self.mode == "scaled":
            bias = 2 * bias
        if self.mode == "batched_where":
            keep = torch.rand(b, 1, s, s) > 0.2
            bias = torch.where(keep, bias, -50.0)  # [b, heads, q, k]
        h = x
        for qkv in self.qkv:
            q, k, v = qkv(h).view(b, s, 3, self.heads, 2).permute(2, 0, 3, 1, 4)
            if self.mode in ("sdpa", "causal"):
                mask = bias.clone() + padding
                out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif self.mode.startswith("expanded"):
                given = bias.expand(b, -1, -1, -1).contiguous()
                scores = q @ k.transpose(-1, -2) + (given if self.mode == "expanded" else given * 2)
                out = (scores + padding).softmax(-1) @ v
            else:
                scores = q @ k.transpose(-1, -2) + bias
                out = (scores + padding).softmax(-1) @ v
            h = h + out.transpose(1, 2).reshape(b, s, 4)
        return self.head(h).squeeze(-1).pow(2).mean(1)  # [b]


@pytest.mark.parametrize("mode", ["eager", "sdpa", "causal", "expanded"])
@pytest.mark.parametrize("batch,s", [(3, 6), (4, 5)], ids=["q=2b", "q!=b"])
def test_relative_bias_is_read_at_its_additions(mode: str, batch: int, s: int) -> None:
    """The bias reaches every layer's scores through shape operations and is read at those
    additions, from the first step (the forward is unchanged): per-sample steps, exact, no
    warning; ``q = 2b``, which the sample-major reading of folded rows would take for two rows
    per sample, included."""
    torch.manual_seed(0)
    model = _RelativeAttention(mode).double()
    assert _per_sample_steps(model, (batch, s, 4)) == [batch] * 3  # (warnings are errors here)


@pytest.mark.parametrize("mode", ["eager", "causal", "expanded"])
@pytest.mark.parametrize("batch_dim", [0, None], ids=["per-sample", "tasks"])
def test_relative_bias_jdoptimizer_grad(mode: str, batch_dim: int | None) -> None:
    torch.manual_seed(0)
    model = _RelativeAttention(mode).double()
    params = list(model.parameters())
    opt = JDOptimizer(torch.optim.SGD(params, lr=0.0), UPGrad(), modules=model, batch_dim=batch_dim)
    for _ in range(2):
        out = model(torch.randn(3, 6, 4, dtype=torch.float64))
        losses = out if batch_dim == 0 else torch.stack([out[:2].mean(), out[2:].mean()])
        jacobian = explicit_jacobian(losses, params)
        opt.zero_grad()
        record = opt.step(losses)
        torch.testing.assert_close(record.gramian, jacobian @ jacobian.T)
        grad = torch.cat([p.grad.reshape(-1) for p in params])
        torch.testing.assert_close(grad, jacobian.T @ record.weights)


def test_relative_bias_expanded_then_scaled_is_read_at_the_expansion() -> None:
    """Copies of the bias expanded along the batch, then multiplied before the addition: not
    read at the additions, but each sample's gradient of the bias is read at the expansion
    (:mod:`jdoptim.autogram._regions`): per-sample steps, exact, no warning."""
    torch.manual_seed(0)
    assert _per_sample_steps(_RelativeAttention("expanded_scaled").double(), (3, 5, 4)) == [3] * 3


@pytest.mark.parametrize("mode", ["scaled", "batched_where"])
def test_relative_bias_used_otherwise_stays_exact(mode: str) -> None:
    """A product before the addition, or a ``where`` that broadcasts the bias to the samples
    itself: not read at additions, exact by one backward row per loss, warned."""
    torch.manual_seed(0)
    with pytest.warns(EngineRouteWarning):
        assert _per_sample_steps(_RelativeAttention(mode).double(), (3, 5, 4)) == [1, 1, 1]


@pytest.mark.parametrize("keywords", [False, True])
def test_expand_inputs_expands_the_shared_arguments_only(keywords: bool) -> None:
    """Along the batch dimension only size-1 arguments grow (BART's decoder position embedding
    also takes the ``[b, s]`` ids, which stay, and the call is then incomplete); along a new
    leading dimension every tensor does. Positional tensors (a layer's call) and keywords (the
    pytree path) give the same."""
    from jdoptim.autogram._shared import expand_inputs

    shared, ids, scale = torch.randn(1, 5, 3), torch.zeros(4, 5), 2.0
    args, kwargs = ((shared, ids), {}) if not keywords else ((shared,), {"ids": ids, "s": scale})
    grown, grown_kwargs, complete = expand_inputs(args, kwargs, 0, 4, new=False)
    assert grown[0].shape == (4, 5, 3) and grown[0].data_ptr() == shared.data_ptr()
    assert (grown_kwargs["ids"] if keywords else grown[1]) is ids and not complete
    grown, grown_kwargs, complete = expand_inputs(args, kwargs, 0, 4, new=True)
    assert grown[0].shape == (4, 1, 5, 3) and complete
    assert (grown_kwargs["ids"] if keywords else grown[1]).shape == (4, 4, 5)
    if keywords:
        assert grown_kwargs["s"] == scale


# -- a stacked shared output whose parts are added by different layers (YOLOS) ----------------


class _LayerPositions(nn.Module):
    """YOLOS's mid-layer position embeddings: one call returns ``[layers, 1, s + 1, d]``."""

    def __init__(self, layers: int, s: int, d: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(layers, 1, s + 1, d) * 0.5)

    def forward(self) -> Tensor:
        return torch.tanh(self.table)


class _PerLayerPositions(nn.Module):
    """Layer ``i`` adds its part of the shared output, taken by ``select`` (``pos[i]``) then a
    ``slice`` along the tokens (``[:, 1:]``, or ``[:, :s]``)."""

    def __init__(self, s: int, leading: bool) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 4)
        self.positions = _LayerPositions(2, s, 4)
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
        self.head = nn.Linear(4, 1)
        self.leading = leading

    def forward(self, x: Tensor) -> Tensor:  # [b, s, 5] → [b]
        h, pos, s = self.embed(x), self.positions(), x.shape[1]
        for i, layer in enumerate(self.layers):
            part = pos[i][:, :s] if self.leading else pos[i][:, 1:]
            h = torch.tanh(layer(h + part))
        return self.head(h).squeeze(-1).pow(2).mean(1)


@pytest.mark.parametrize("leading", [False, True], ids=["[:, 1:]", "[:, :s]"])
@pytest.mark.parametrize("batch,s", [(3, 4), (4, 4)], ids=["s!=b", "s=b"])
def test_parts_of_a_stacked_shared_output_are_read_at_their_additions(
    batch: int, s: int, leading: bool
) -> None:
    """Each layer's part reaches its addition through ``select`` and ``slice``, replayed on the
    re-run: per-sample steps, exact, no warning."""
    torch.manual_seed(0)
    model = _PerLayerPositions(s, leading).double()
    assert _per_sample_steps(model, (batch, s, 5)) == [batch] * 3
