"""``opt.step(losses, features=z)``: weights from the Gramian of ∂ℓᵢ/∂z, exact update.

Oracles: the Gramian of the per-loss gradients with respect to ``z``, one ``autograd.grad`` per
loss; the expected ``.grad``, one ``autograd.grad`` per loss and per parameter, combined by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import (
    MGDA,
    GradDrop,
    GramianWeightedAggregator,
    IMTLGWeighting,
    MGDAWeighting,
    UPGrad,
    UPGradWeighting,
)
from jdoptim.scalarization import Mean as MeanScalarizer


class Net(nn.Module):
    """A trunk, a skip parameter reached around ``z``, and one head per task."""

    def __init__(self, m: int, skip: bool = False) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(m))
        self.skip = nn.Parameter(torch.randn(5)) if skip else None

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = self.trunk(x)
        out = []
        for t, head in enumerate(self.heads):
            pred = head(z).squeeze(-1)
            if self.skip is not None:
                pred = pred + x @ self.skip  # reaches the losses without passing through z
            out.append((pred - y[:, t]).pow(2).mean() * (t + 1))
        return out, z


def _data(m: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(
        16, m, generator=g, dtype=torch.float64
    )


def _explicit(
    model: Net, x: Tensor, y: Tensor, params: list[nn.Parameter]
) -> tuple[Tensor, list[list[Tensor]]]:
    """``Z Zᵀ`` and, for every loss, its gradient with respect to every parameter."""
    losses, z = model.losses(x, y)
    rows = [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses]
    z_matrix = torch.stack(rows)
    grads = []
    for loss in losses:
        row = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(row, params)])
    return z_matrix @ z_matrix.T, grads


def _grads_after_step(
    model: Net, aggregator, x: Tensor, y: Tensor, scope: str = "shared"
) -> tuple[JDOptimizer, dict[str, Tensor]]:
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), aggregator, scope=scope)
    losses, z = model.losses(x, y)
    opt.step(losses, features=z)
    return opt, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("weighting", [UPGradWeighting, MGDAWeighting, IMTLGWeighting])
def test_weights_and_grads_match_explicit_computation(m, weighting):
    torch.manual_seed(m)
    model = Net(m).double()
    x, y = _data(m)
    names, params = zip(*model.named_parameters())
    gramian, grads = _explicit(model, x, y, list(params))
    expected_weights = weighting()(gramian)
    opt, got = _grads_after_step(model, GramianWeightedAggregator(weighting()), x, y)
    record = opt.last_record
    torch.testing.assert_close(record.gramian, gramian)
    torch.testing.assert_close(record.weights, expected_weights)
    assert record.extras["features"] is True
    for k, name in enumerate(names):
        if name.startswith("heads."):
            task = int(name.split(".")[1])
            expected = grads[task][k]  # a head gets its own loss's gradient
        else:
            expected = sum(w * g[k] for w, g in zip(expected_weights, grads))
        torch.testing.assert_close(got[name], expected, msg=name)


def test_scope_all_weights_every_parameter():
    m = 3
    model = Net(m).double()
    x, y = _data(m)
    names, params = zip(*model.named_parameters())
    gramian, grads = _explicit(model, x, y, list(params))
    weights = UPGradWeighting()(gramian)
    _, got = _grads_after_step(model, UPGrad(), x, y, scope="all")
    for k, name in enumerate(names):
        torch.testing.assert_close(got[name], sum(w * g[k] for w, g in zip(weights, grads)))


def test_parameter_reached_around_features_gets_the_weighted_gradient():
    """A shared parameter that reaches the losses without passing through z (a skip) still gets
    exactly Σ wᵢ ∇ℓᵢ: the shared gradients come from one backward of Σ wᵢ ℓᵢ, not through z."""
    m = 3
    model = Net(m, skip=True).double()
    x, y = _data(m)
    names, params = zip(*model.named_parameters())
    gramian, grads = _explicit(model, x, y, list(params))
    weights = UPGradWeighting()(gramian)
    _, got = _grads_after_step(model, UPGrad(), x, y)
    k = names.index("skip")
    torch.testing.assert_close(got["skip"], sum(w * g[k] for w, g in zip(weights, grads)))


def test_mgda_ub_on_two_tasks_matches_the_closed_form():
    """MGDA on two features-gradients z₁, z₂: w₁ = clip(⟨z₂ − z₁, z₂⟩ / ‖z₁ − z₂‖², 0, 1)."""
    model = Net(2).double()
    x, y = _data(2)
    gramian, _ = _explicit(model, x, y, list(model.parameters()))
    a, b, c = gramian[0, 0], gramian[0, 1], gramian[1, 1]
    w1 = ((c - b) / (a - 2 * b + c)).clamp(0, 1)
    opt, _ = _grads_after_step(model, MGDA(), x, y)
    torch.testing.assert_close(opt.last_record.weights, torch.stack([w1, 1 - w1]))


def _state(model: nn.Module) -> list[Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()] + [
        p.detach().clone() for p in model.parameters()
    ]


def _unchanged(before: list[Tensor | None], model: nn.Module) -> bool:
    after = _state(model)
    return all(
        (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
        for a, b in zip(before, after)
    )


def test_jacobian_method_is_refused_and_nothing_changes():
    model = Net(3).double()
    x, y = _data(3)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), GradDrop())
    losses, z = model.losses(x, y)
    before = _state(model)
    with pytest.raises(TypeError, match="Gramian-based method; GradDrop"):
        opt.step(losses, features=z)
    assert _unchanged(before, model)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        ("detached", ValueError, "detached copy or a leaf"),
        ("unused", ValueError, "No loss depends on features"),
        ("not a tensor", TypeError, "shared representation tensor"),
    ],
)
def test_bad_features_are_refused_and_nothing_changes(bad, error, match):
    model = Net(2).double()
    x, y = _data(2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    losses, z = model.losses(x, y)
    features = {
        "detached": z.detach(),
        "unused": model.trunk(x) * 2.0,
        "not a tensor": [z],
    }[bad]
    before = _state(model)
    with pytest.raises(error, match=match):
        opt.step(losses, features=features)
    assert _unchanged(before, model)


def test_features_with_a_scalarizer_is_refused():
    model = Net(2).double()
    x, y = _data(2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), MeanScalarizer())
    losses, z = model.losses(x, y)
    with pytest.raises(ValueError, match="scalarizer"):
        opt.step(losses, features=z)


def test_engine_optimizer_gives_the_same_features_step():
    """With modules= (the Gramian engine), a features= step takes the same route and result."""
    m = 3
    plain, hooked = Net(m).double(), Net(m).double()
    hooked.load_state_dict(plain.state_dict())
    x, y = _data(m)
    _, expected = _grads_after_step(plain, UPGrad(), x, y)
    opt = JDOptimizer(torch.optim.SGD(hooked.parameters(), lr=0.0), UPGrad(), modules=hooked)
    losses, z = hooked.losses(x, y)
    opt.step(losses, features=z)
    for name, p in hooked.named_parameters():
        torch.testing.assert_close(p.grad, expected[name])


class SharedNeck(nn.Module):
    """A shared layer after z (reached by every loss without passing through z), then heads."""

    def __init__(self, m: int) -> None:
        super().__init__()
        self.trunk = nn.Linear(5, 4)
        self.neck = nn.Linear(4, 4)
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(m))

    def losses(self, x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        z = torch.tanh(self.trunk(x))
        h = torch.tanh(self.neck(z))
        return [
            (head(h).squeeze(-1) - y[:, t]).pow(2).mean() for t, head in enumerate(self.heads)
        ], z


@pytest.mark.parametrize("stacked", [False, True])
def test_shared_layer_after_features_and_stacked_losses(stacked):
    """Heads that share nodes (one backward per loss gives Z) and one 1-D tensor of losses (a
    batched backward gives Z; every reached parameter is shared)."""
    m = 3
    model = SharedNeck(m).double()
    x, y = _data(m)
    params = list(model.parameters())
    losses, z = model.losses(x, y)
    rows = torch.stack(
        [torch.autograd.grad(loss, z, retain_graph=True)[0].flatten() for loss in losses]
    )
    grads = []
    for loss in losses:
        row = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if g is None else g for g, p in zip(row, params)])
    weights = UPGradWeighting()(rows @ rows.T)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad())
    opt.step(torch.stack(losses) if stacked else losses, features=z)
    torch.testing.assert_close(opt.last_record.weights, weights)
    for k, (name, p) in enumerate(model.named_parameters()):
        if name.startswith("heads.") and not stacked:
            expected = grads[int(name.split(".")[1])][k]
        else:
            expected = sum(w * g[k] for w, g in zip(weights, grads))
        torch.testing.assert_close(p.grad, expected, msg=name)


def test_which_route_computes_z(monkeypatch):
    """Separate heads take the one-pass route; heads sharing a layer take one pass per loss."""
    import jdoptim.updates.features as features_step

    calls: list[str] = []
    for name in ("one_heads_pass", "per_loss_pass"):
        original = getattr(features_step, name)

        def spy(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(features_step, name, spy)
    for model in (Net(3).double(), SharedNeck(3).double()):
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), UPGrad())
        losses, z = model.losses(*_data(3))
        opt.step(losses, features=z)
    assert calls == ["one_heads_pass", "per_loss_pass"]


def _every_gramian_method() -> list[tuple[str, object]]:
    import jdoptim.aggregation as agg

    makers = {
        "UPGrad": lambda: agg.UPGrad(),
        "DualProj": lambda: agg.DualProj(),
        "MGDA": lambda: agg.MGDA(),
        "IMTLG": lambda: agg.IMTLG(),
        "CAGrad": lambda: agg.CAGrad(),
        "AlignedMTL": lambda: agg.AlignedMTL(),
        "FairGrad": lambda: agg.FairGrad(),
        "ConFIG": lambda: agg.ConFIG(),
        "NashMTL": lambda: agg.NashMTL(),
        "Mean": lambda: agg.Mean(),
        "Sum": lambda: agg.Sum(),
        "Constant": lambda: agg.Constant(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)),
        "PCGrad": lambda: agg.PCGrad(seed=0),
        "GradVac": lambda: agg.GradVac(seed=0),
        "Random": lambda: agg.Random(seed=0),
        "PCD": lambda: agg.PCD(),
        "CRMOGM(UPGrad)": lambda: agg.GramianWeightedAggregator(
            agg.CRMOGMWeighting(agg.UPGradWeighting())
        ),
        "IMTL": lambda: agg.IMTL(),
        "GradNorm": lambda: agg.GradNorm(),
    }
    return list(makers.items())


@pytest.mark.parametrize("name, make", _every_gramian_method(), ids=lambda v: str(v)[:20])
def test_every_gramian_method_runs_on_features(name, make):
    """Two steps of every Gramian-based method on features: the weights equal those of a twin
    instance fed the explicit Gramian of ∂ℓᵢ/∂z (and the loss values, for IMTL and GradNorm)."""
    from jdoptim.aggregation import GramianWeightedAggregator, MethodInputs
    from jdoptim.aggregation._inputs import InputWeighting

    m = 3
    model = Net(m).double()
    method, twin = make(), make()
    assert isinstance(method, GramianWeightedAggregator), name
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), method)
    for seed in range(2):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        y = torch.randn(16, m, generator=g, dtype=torch.float64)
        gramian, _ = _explicit(model, x, y, list(model.parameters()))
        losses, z = model.losses(x, y)
        if isinstance(twin.weighting, InputWeighting):
            values = torch.stack([loss.detach() for loss in losses])
            expected = twin.weighting(MethodInputs(gramian=gramian, losses=values))
        else:
            expected = twin.weighting(gramian)
        opt.zero_grad()
        opt.step(losses, features=z)
        torch.testing.assert_close(opt.last_record.weights, expected, atol=1e-7, rtol=1e-6)


def test_grad_scaler_gives_the_unscaled_features_step():
    m = 3
    plain, scaled = Net(m).double(), Net(m).double()
    scaled.load_state_dict(plain.state_dict())
    x, y = _data(m)
    _, expected = _grads_after_step(plain, UPGrad(), x, y)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = JDOptimizer(torch.optim.SGD(scaled.parameters(), lr=0.0), UPGrad())
    losses, z = scaled.losses(x, y)
    opt.step(losses, features=z, grad_scaler=scaler)
    scaler.update()
    gramian, _ = _explicit(plain, x, y, list(plain.parameters()))
    torch.testing.assert_close(opt.last_record.gramian, gramian)
    for name, p in scaled.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def _reach_graphs() -> dict[str, tuple[list[Tensor], Tensor]]:
    """Losses computed from a representation ``z``, in the shapes that the walk must get right."""
    torch.manual_seed(0)
    x = torch.randn(7, 5)
    trunk, h1, h2, h3 = nn.Linear(5, 6), nn.Linear(3, 1), nn.Linear(3, 1), nn.Linear(3, 1)
    skip, own = nn.Parameter(torch.randn(5)), nn.Parameter(torch.randn(()))
    z = torch.tanh(trunk(x))
    a, b = z.chunk(2, dim=1)
    heads_z = nn.Linear(6, 1), nn.Linear(6, 1), nn.Linear(6, 1)
    graphs = {
        "separate heads": ([head(z).pow(2).mean() for head in heads_z], z),
        # loss 1 also reaches the trunk through a sibling chunk of z's node (not through z)
        "split": ([h1(a).pow(2).mean(), (h3(a) * h2(b)).pow(2).mean()], a),
        # one loss reaches a parameter around z; another does not depend on z at all
        "skip and a loss without z": (
            [heads_z[0](z).mean() + (x @ skip).mean(), heads_z[1](z).abs().mean(), own * 2.0],
            z,
        ),
    }
    shared_head = heads_z[2](z)  # one node reached by two losses: not exclusive
    graphs["shared head"] = ([shared_head.mean(), shared_head.pow(2).mean()], z)
    return graphs


@pytest.mark.parametrize("case", ["separate heads", "split", "skip and a loss without z"])
def test_walk_through_features_gives_the_general_walks_masks(case: str) -> None:
    """The one-walk reach of a features= step equals the general two-pass walk's (an
    independent algorithm: a topological propagation of loss bitmasks over the whole graph)."""
    from jdoptim.introspection import leaf_reach, leaf_reach_through

    losses, z = _reach_graphs()[case]
    reach, heads = leaf_reach_through(losses, z)
    assert reach is not None and heads.exclusive
    expected = {(id(leaf), mask) for leaf, mask in leaf_reach(losses)}
    assert {(id(leaf), mask) for leaf, mask in reach} == expected
    assert len(reach) == len(expected)  # each leaf once


def test_walk_through_features_defers_to_the_general_walk_on_shared_heads() -> None:
    from jdoptim.introspection import leaf_reach_through
    from jdoptim.losses import parse_losses
    from jdoptim.parameter_plan import plan_parameters

    losses, z = _reach_graphs()["shared head"]
    reach, heads = leaf_reach_through(losses, z)
    assert reach is None and not heads.exclusive
    params = list({p for loss in losses for p in _leaves(loss)})
    plan = plan_parameters(parse_losses(losses), params, "shared", features=z)
    assert len(plan.shared) == len(params) and not plan.specific  # all reached by both losses


def _leaves(loss: Tensor) -> list[Tensor]:
    from jdoptim.introspection import collect_loss_leaves

    return list(collect_loss_leaves(loss))


def test_rows_consistency_check_accepts_rounding_and_refuses_a_missed_row():
    """The one-pass route's guard: rows summed in another order pass; a row missed, doubled or
    non-finite fails (the step then takes one backward per loss). (A row below the rounding of
    the sum, here rows[0] at 1e-6 of the largest, is beyond what any sum check can see.)"""
    from jdoptim.updates.features import _rows_add_up

    torch.manual_seed(0)
    rows = torch.randn(32, 4096) * torch.logspace(-3, 3, 32)[:, None]  # float32, mixed scales
    total = rows.flip(0).cumsum(0)[-1].reshape(64, 64)  # the same sum, another order
    assert _rows_add_up(rows, total)
    assert not _rows_add_up(rows, total - rows[16].reshape(64, 64))  # a row missed
    assert not _rows_add_up(rows, total + rows[20].reshape(64, 64))  # a row counted twice
    broken = rows.clone()
    broken[3, 7] = float("nan")
    assert not _rows_add_up(broken, total)


def test_benchmark_floor_step_computes_the_library_update(monkeypatch):
    """The ``features=`` benchmark's hand-written floor step (``bare_step_pair``) must be the
    same computation as the library's step, or its ratio is no floor: same model, same ``.grad``."""
    import copy

    import benchmarks.test_bench_features as bench
    from benchmarks.models import TrunkWithHeads

    torch.manual_seed(0)
    template = TrunkWithHeads(4, (8, 16, 8))
    made: list[torch.nn.Module] = []

    def same_model(n_tasks: int, widths: tuple[int, ...]) -> torch.nn.Module:
        made.append(copy.deepcopy(template))
        return made[-1]

    monkeypatch.setattr(bench, "TrunkWithHeads", same_model)
    bare_step, _ = bench.bare_step_pair("upgrad", 4, batch=16, widths=(8, 16, 8))
    bare_model = made[-1]
    library_step, _, _ = bench.step_pair("upgrad", 4, batch=16, widths=(8, 16, 8))
    library_model = made[-1]
    bare_step()
    library_step()
    for (name, p), q in zip(bare_model.named_parameters(), library_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
