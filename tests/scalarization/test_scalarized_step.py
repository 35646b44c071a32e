"""JDOptimizer(opt, scalarizer): the step against a plain backward of the scalarized loss (with
TorchJD's scalarizers as the outside oracle), each method's machinery, checkpoints, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

import jdoptim.scalarization as S
from jdoptim import JDOptimizer

T = pytest.importorskip("torchjd.scalarization")
D = torch.float64


class Net(nn.Module):
    def __init__(self, tasks: int = 3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(6, 1) for _ in range(tasks))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = self.trunk(x)
        return [head(z).squeeze(-1) for head in self.heads]


def batch(step: int, tasks: int = 3, dtype: torch.dtype = D) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 4, generator=g, dtype=dtype), torch.randn(
        16, tasks, generator=g, dtype=dtype
    )


def losses_of(model: Net, step: int) -> list[Tensor]:
    x, y = batch(step, len(model.heads), next(model.parameters()).dtype)
    return [(out - y[:, t]).pow(2).mean() + 0.1 for t, out in enumerate(model(x))]


def snapshot(model: nn.Module, extra: list[Tensor] = ()) -> list[Tensor]:
    return [p.detach().clone() for p in [*model.parameters(), *extra]]


def assert_same(a: list[Tensor], b: list[Tensor], exact: bool = False) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y)


def plain_step(model: Net, opt: torch.optim.Optimizer, scalarizer, step: int) -> Tensor:
    opt.zero_grad()
    loss = scalarizer(torch.stack(losses_of(model, step)))
    loss.backward()
    opt.step()
    return loss


W = torch.tensor([0.2, 0.5, 0.3], dtype=D)
STATELESS = [
    (lambda: S.Sum(), lambda: T.Sum()),
    (lambda: S.Mean(), lambda: T.Mean()),
    (lambda: S.Constant(W), lambda: T.Constant(W)),
    (lambda: S.GeometricMean(), lambda: T.GeometricMean()),
    (lambda: S.COSMOS(0.5, W), lambda: T.COSMOS(0.5, W)),
    (lambda: S.PBI(3.0, W), lambda: T.PBI(3.0, W)),
    (lambda: S.STCH(0.2, W), lambda: T.STCH(0.2, W)),
]


@pytest.mark.parametrize(("mine", "oracle"), STATELESS)
def test_step_equals_the_backward_of_torchjds_scalarized_loss(mine, oracle) -> None:
    a, b = Net().double(), Net().double()
    jd = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), mine())
    plain, reference = torch.optim.SGD(b.parameters(), lr=0.1), oracle()
    for step in range(3):
        jd.zero_grad()
        record = jd.step(losses_of(a, step))
        values = torch.stack(losses_of(b, step)).detach().requires_grad_()
        expected = torch.autograd.grad(reference(values), values)[0]
        torch.testing.assert_close(record.weights, expected)  # the effective weights ∂s/∂ℓ
        plain_step(b, plain, reference, step)
        assert_same(snapshot(a), snapshot(b))


def test_uw_and_imtll_parameters_are_trained_with_the_model() -> None:
    for mine, oracle, name in [(S.UW, T.UW, "log_var"), (S.IMTLL, T.IMTLL, "log_scale")]:
        a, b = Net().double(), Net().double()
        scalarizer, reference = mine(3).double(), oracle(3).double()
        jd = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.05), scalarizer)
        assert len(jd.param_groups) == 2 and jd.param_groups[1]["params"] == [
            getattr(scalarizer, name)
        ]
        plain = torch.optim.SGD([*b.parameters(), *reference.parameters()], lr=0.05)
        for step in range(4):
            jd.zero_grad()
            current = getattr(scalarizer, name).detach().clone()
            record = jd.step(losses_of(a, step))
            plain_step(b, plain, reference, step)
            # effective weights: e^{-s}/2 for UW, e^{s} for IMTL-L, at the step's log-scales
            expected = torch.exp(-current) / 2 if name == "log_var" else torch.exp(current)
            torch.testing.assert_close(record.weights, expected)
        learned = getattr(scalarizer, name).detach()
        assert not torch.equal(learned, torch.zeros(3, dtype=D))  # trained, not left at 0
        torch.testing.assert_close(learned, getattr(reference, name).detach())
        assert_same(snapshot(a), snapshot(b))


def test_learnable_parameters_the_optimizer_already_holds_add_no_group() -> None:
    model, uw = Net().double(), S.UW(3).double()
    jd = JDOptimizer(torch.optim.Adam([*model.parameters(), *uw.parameters()]), uw)
    assert len(jd.param_groups) == 1
    adamw = torch.optim.AdamW(Net().parameters(), weight_decay=0.1)
    JDOptimizer(adamw, S.IMTLL(3))
    assert adamw.param_groups[1]["weight_decay"] == 0.0


def test_famo_with_a_closure_is_the_papers_algorithm() -> None:
    a, b = Net().double(), Net().double()
    famo, reference = S.FAMO(3).double(), T.FAMO(3).double()
    jd = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), famo)
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    for step in range(4):
        jd.zero_grad()
        record = jd.step(closure=lambda step=step: losses_of(a, step))
        values = torch.stack(losses_of(b, step))
        expected = torch.autograd.grad(reference(values), values, retain_graph=True)[0]
        torch.testing.assert_close(record.weights, expected)
        plain_step(b, plain, reference, step)
        with torch.no_grad():
            reference.update(torch.stack(losses_of(b, step)))  # same batch, after the step
        torch.testing.assert_close(famo.logits.detach(), reference._w.detach())
        assert not famo.pending_update
    assert_same(snapshot(a), snapshot(b))


def test_famo_without_a_closure_updates_from_the_next_steps_losses() -> None:
    a, b = Net().double(), Net().double()
    famo, reference = S.FAMO(3).double(), T.FAMO(3).double()
    jd = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), famo)
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    for step in range(4):
        jd.zero_grad()
        jd.step(losses_of(a, step))
        if step > 0:  # the previous step's update, from this step's losses (a new batch)
            with torch.no_grad():
                reference.update(torch.stack(losses_of(b, step)))
        plain_step(b, plain, reference, step)
        torch.testing.assert_close(famo.logits.detach(), reference._w.detach())
    assert famo.pending_update
    assert_same(snapshot(a), snapshot(b))


def test_dwa_end_epoch_and_window_match_torchjds_epochs() -> None:
    for make in (lambda: S.DWA(), lambda: S.DWA(window=3)):
        a, b = Net().double(), Net().double()
        dwa, reference = make(), T.DWA()
        jd = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), dwa)
        plain = torch.optim.SGD(b.parameters(), lr=0.1)
        for epoch in range(4):
            for step in range(3):
                jd.zero_grad()
                record = jd.step(losses_of(a, 3 * epoch + step))
                plain_step(b, plain, reference, 3 * epoch + step)
            if dwa.window is None:
                jd.end_epoch()
            reference.step()
        assert not torch.equal(record.weights, torch.ones(3, dtype=D))  # DWA weights in use
        assert_same(snapshot(a), snapshot(b))


def test_stch_warmup_then_the_estimated_ideal_point() -> None:
    model = Net().double()
    stch = S.STCH(0.3, warmup_steps=3)
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), stch)
    seen = []
    for step in range(3):
        record = jd.step(losses_of(model, step))
        torch.testing.assert_close(record.weights, torch.full((3,), 1 / 3, dtype=D))
        seen.append(record.losses)
    ideal = torch.stack(seen).min(dim=0).values
    torch.testing.assert_close(stch.ideal_point(), ideal)
    record = jd.step(losses_of(model, 3))
    values = record.losses.clone().requires_grad_()
    expected = torch.autograd.grad(T.STCH(0.3, reference=ideal)(values), values)[0]
    torch.testing.assert_close(record.weights, expected)


def run(make, steps: range, model: Net, jd: JDOptimizer, closure: bool) -> list[Tensor]:
    weights = []
    for step in steps:
        jd.zero_grad()
        if closure:
            record = jd.step(closure=lambda step=step: losses_of(model, step))
        else:
            record = jd.step(losses_of(model, step))
        weights.append(record.weights)
    return weights


CHECKPOINTED = [
    (lambda: S.UW(3), False),
    (lambda: S.IMTLL(3), False),
    (lambda: S.FAMO(3), True),
    (lambda: S.FAMO(3), False),
    (lambda: S.DWA(window=2), False),
    (lambda: S.STCH(0.5, warmup_steps=3), False),
    (lambda: S.Random(seed=5), False),
]


@pytest.mark.parametrize(("make", "closure"), CHECKPOINTED)
def test_a_checkpoint_resumes_the_identical_trajectory(make, closure) -> None:
    model = Net().float()
    jd = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), make())
    run(make, range(4), model, jd, closure)
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(jd.state_dict())
    weights = run(make, range(4, 9), model, jd, closure)
    expected = snapshot(model, list(jd.aggregator.parameters()))

    fresh = Net(seed=1).float()
    resumed = JDOptimizer(torch.optim.Adam(fresh.parameters(), lr=0.01), make())
    fresh.load_state_dict(saved_model)
    resumed.load_state_dict(saved_opt)
    resumed_weights = run(make, range(4, 9), fresh, resumed, closure)
    assert_same(snapshot(fresh, list(resumed.aggregator.parameters())), expected, exact=True)
    assert_same(resumed_weights, weights, exact=True)


def test_dwa_end_epoch_state_is_checkpointed() -> None:
    model = Net().float()
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), S.DWA())
    for epoch in range(2):
        run(None, range(2 * epoch, 2 * epoch + 2), model, jd, False)
        jd.end_epoch()
    run(None, range(4, 5), model, jd, False)  # mid-epoch
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(jd.state_dict()))
    jd.zero_grad()
    jd.step(losses_of(model, 5))
    jd.end_epoch()
    expected = run(None, range(6, 8), model, jd, False)
    fresh = Net(seed=3).float()
    resumed = JDOptimizer(torch.optim.SGD(fresh.parameters(), lr=0.1), S.DWA())
    fresh.load_state_dict(saved[0])
    resumed.load_state_dict(saved[1])
    resumed.zero_grad()
    resumed.step(losses_of(fresh, 5))
    resumed.end_epoch()
    assert_same(run(None, range(6, 8), fresh, resumed, False), expected, exact=True)
    assert_same(snapshot(fresh), snapshot(model), exact=True)


def state_of(model: Net, jd: JDOptimizer) -> tuple:
    grads = [None if p.grad is None else p.grad.clone() for p in jd_params(jd)]
    return snapshot(model), grads, copy.deepcopy(jd.state_dict())


def jd_params(jd: JDOptimizer) -> list[Tensor]:
    return [p for group in jd.param_groups for p in group["params"]]


def assert_unchanged(before: tuple, after: tuple) -> None:
    assert_same(before[0], after[0], exact=True)
    for x, y in zip(before[1], after[1]):
        assert (x is None and y is None) or torch.equal(x, y)
    assert_nested_equal(before[2], after[2])


def assert_nested_equal(a: object, b: object) -> None:
    """Bit-for-bit equality of nested state dicts (tensors compared with torch.equal)."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_nested_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_nested_equal(x, y)
    else:
        assert a == b


def prepared(scalarizer, steps: int = 2, closure: bool = False) -> tuple[Net, JDOptimizer]:
    model = Net().double()
    jd = JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), scalarizer)
    run(None, range(steps), model, jd, closure)
    jd.zero_grad()
    model(batch(0)[0])[0].sum().backward()  # some .grad the refused step must keep
    return model, jd


@pytest.mark.parametrize(
    ("scalarizer", "bad_losses", "error", "match"),
    [
        (S.UW(3), lambda m: losses_of(m, 9)[:2], ValueError, "built for values of shape"),
        (
            S.FAMO(3),
            lambda m: [losses_of(m, 9)[0] - 5.0, *losses_of(m, 9)[1:]],
            ValueError,
            "lower bound",
        ),
        (S.DWA(), lambda m: losses_of(m, 9)[:2], ValueError, "call reset"),
        (S.STCH(1.0, warmup_steps=1), lambda m: losses_of(m, 9)[:2], ValueError, "running minimum"),
        (
            S.FAMO(3),
            lambda m: [losses_of(m, 9)[0] * float("nan"), *losses_of(m, 9)[1:]],
            FloatingPointError,
            "Non-finite loss",
        ),
        (
            S.GeometricMean(),
            lambda m: [losses_of(m, 9)[0] * 0.0, *losses_of(m, 9)[1:]],
            FloatingPointError,
            "effective weight",
        ),
        (
            S.Sum(),
            lambda m: [torch.ones((), dtype=D, requires_grad=True)] * 3,
            ValueError,
            "reach none",
        ),
        (
            S.FAMO(3),
            lambda m: [torch.ones((), dtype=D, requires_grad=True)] * 3,
            ValueError,
            "reach none",
        ),
        (
            S.Sum(),
            lambda m: [(m.heads[0].weight.sum() * 0.0).sqrt(), *losses_of(m, 9)[1:]],
            FloatingPointError,
            "Non-finite gradient",
        ),
        (
            S.FAMO(3),
            lambda m: [(m.heads[0].weight.sum() * 0.0).sqrt() + 1, *losses_of(m, 9)[1:]],
            FloatingPointError,
            "Non-finite gradient",
        ),
    ],
)
def test_a_refused_step_changes_nothing(scalarizer, bad_losses, error, match) -> None:
    model, jd = prepared(scalarizer)
    before = state_of(model, jd)
    with pytest.raises(error, match=match):
        jd.step(bad_losses(model))
    assert_unchanged(before, state_of(model, jd))


def test_a_sqrt_at_zero_is_refused_as_a_nonfinite_gradient_and_skip_mode() -> None:
    model = Net().double()
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), S.Mean(), nonfinite="skip")
    before = state_of(model, jd)
    losses = losses_of(model, 0)
    first = model.heads[0].weight.sum() * 0.0
    record = jd.step([first.sqrt(), *losses[1:]])
    assert record.skipped and "Non-finite gradient" in record.reason
    assert_unchanged(before, state_of(model, jd))


def test_construction_errors() -> None:
    model = Net()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="process_group is not supported"):
        JDOptimizer(sgd, S.Sum(), process_group=True)
    with pytest.raises(ValueError, match="batch_dim"):
        JDOptimizer(sgd, S.Sum(), batch_dim=0)
    with pytest.raises(ValueError, match="freeze_foreign"):
        JDOptimizer(sgd, S.Sum(), freeze_foreign=True)
    partial, uw = torch.optim.SGD(model.parameters(), lr=0.1), S.UW(3)
    uw.extra = nn.Parameter(torch.zeros(1))
    uw.learnable_parameters = lambda: [uw.log_var, uw.extra]  # a method with two of them
    partial.add_param_group({"params": [uw.log_var]})
    with pytest.raises(ValueError, match="some of UW's learnable parameters but not all"):
        JDOptimizer(partial, uw)
    assert len(partial.param_groups) == 2
    scheduled = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(scheduled, 10)
    with pytest.raises(ValueError, match="build the scheduler after JDOptimizer"):
        JDOptimizer(scheduled, S.UW(3))
    assert len(scheduled.param_groups) == 1
    JDOptimizer(scheduled, S.FAMO(3))  # no learnable parameter to add: fine


def test_modules_are_accepted_and_not_hooked() -> None:
    model = Net().double()
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), S.Sum(), modules=model)
    assert not model.trunk[0]._forward_hooks and not model.trunk[0]._forward_pre_hooks
    record = jd.step(losses_of(model, 0))
    torch.testing.assert_close(record.weights, torch.ones(3, dtype=D))


@pytest.mark.parametrize(
    "make",
    [
        lambda: S.UW(3).double(),
        lambda: S.IMTLL(3).double(),
        lambda: S.FAMO(3).double(),
        lambda: S.COSMOS(0.5, torch.tensor([0.2, 0.3, 0.5], dtype=D)),
        lambda: S.STCH(0.5, warmup_steps=1),
        lambda: S.GeometricMean(),
    ],
)
def test_grad_scaler_gives_the_unscaled_step(make) -> None:
    """Under a GradScaler the weights (closed form or autograd) are scaled into the backward
    and the learnable parameters' gradients scaled with them; unscaled, the same trajectory."""
    a, b = Net().double(), Net().double()
    b.load_state_dict(a.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    jd_a = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), make())
    jd_b = JDOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), make())
    for step in range(3):
        jd_a.zero_grad()
        jd_b.zero_grad()
        record = jd_a.step(losses_of(a, step), grad_scaler=scaler)
        scaler.update()
        jd_b.step(losses_of(b, step))
        assert not record.skipped
    assert_same(
        snapshot(a, list(jd_a.aggregator.parameters())),
        snapshot(b, list(jd_b.aggregator.parameters())),
    )


def test_foreign_parameters_are_not_touched() -> None:
    model = Net().double()
    jd = JDOptimizer(torch.optim.SGD(model.trunk.parameters(), lr=0.1), S.Sum())
    jd.step(losses_of(model, 0))
    assert all(p.grad is None for p in model.heads.parameters())
    assert all(p.grad is not None for p in model.trunk.parameters())


def test_the_weights_are_computed_outside_autocast() -> None:
    model = Net().float()
    w = torch.tensor([0.3, 0.3, 0.4])
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), S.PBI(2.0, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        record = jd.step(losses_of(model, 0))
    values = record.losses.clone().requires_grad_()
    expected = torch.autograd.grad(T.PBI(2.0, w)(values), values)[0]
    assert record.weights.dtype == torch.float32
    torch.testing.assert_close(record.weights, expected)


def test_famo_closure_whose_recomputed_losses_are_not_finite() -> None:
    for mode in ("raise", "skip"):
        model = Net().double()
        famo = S.FAMO(3).double()
        jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), famo, nonfinite=mode)
        calls = []

        def closure(calls=calls, model=model):
            calls.append(1)
            losses = losses_of(model, 0)
            return losses if len(calls) == 1 else [losses[0] * float("inf"), *losses[1:]]

        before = snapshot(model)
        if mode == "raise":
            with pytest.raises(FloatingPointError, match="model step was taken"):
                jd.step(closure=closure)
        else:
            record = jd.step(closure=closure)
            assert "famo_update" in record.extras and not record.skipped
        assert not torch.equal(snapshot(model)[0], before[0])  # the model step happened
        assert torch.equal(famo.logits.detach(), torch.zeros(3, dtype=D))
        assert famo.pending_update  # the next step's losses will update the logits


def test_end_epoch_is_a_no_op_for_aggregators() -> None:
    from jdoptim import UPGrad

    model = Net().double()
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    jd.step(losses_of(model, 0))
    before = snapshot(model)
    jd.end_epoch()
    assert_same(snapshot(model), before, exact=True)


# -- the reliability guarantees of a JD step (issue 19) hold for the scalarized step too --------


@pytest.mark.parametrize("scalarizer", [S.Mean(), S.FAMO(3), S.UW(3)], ids=["mean", "famo", "uw"])
def test_re_stepped_losses_are_refused_with_nothing_changed(scalarizer) -> None:
    from jdoptim.losses import StaleGraphError

    model, jd = prepared(scalarizer)
    losses = losses_of(model, 5)
    jd.step(losses)
    before = state_of(model, jd)
    with pytest.raises(StaleGraphError, match="already used by a step"):
        jd.step(losses)
    assert_unchanged(before, state_of(model, jd))


def test_backward_then_step_is_a_stale_graph_error_with_nothing_changed() -> None:
    from jdoptim.losses import StaleGraphError

    model, jd = prepared(S.FAMO(3))
    losses = losses_of(model, 5)
    sum(losses).backward()
    before = state_of(model, jd)
    with pytest.raises(StaleGraphError, match="already freed"):
        jd.step(losses)
    assert_unchanged(before, state_of(model, jd))


def test_a_scalarizer_class_or_name_asks_for_an_instance() -> None:
    sgd = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(
        TypeError, match=r"aggregator=UW is a class: pass an instance, aggregator=UW\(\)"
    ):
        JDOptimizer(sgd, S.UW)
    with pytest.raises(TypeError, match=r"aggregator=FAMO\(\) \(from jdoptim.scalarization import"):
        JDOptimizer(sgd, "famo")
    with pytest.raises(TypeError, match=r"aggregator=Mean\(\) \(from jdoptim.aggregation import"):
        JDOptimizer(sgd, "mean")  # the name of both an aggregator and a scalarizer


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_step_runs_under_no_grad_and_names_a_forward_inside_it(mode) -> None:
    a, b = Net().double(), Net().double()
    jd = JDOptimizer(torch.optim.SGD(a.parameters(), lr=0.1), S.Mean())
    plain = torch.optim.SGD(b.parameters(), lr=0.1)
    losses = losses_of(a, 0)
    with mode():
        jd.step(losses)
    plain_step(b, plain, T.Mean(), 0)
    assert_same(snapshot(a), snapshot(b))
    with mode():
        inside = losses_of(a, 1)
        with pytest.raises(ValueError, match="no_grad"):
            jd.step(inside)


def test_process_group_false_is_accepted() -> None:
    model = Net().double()
    jd = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), S.Sum(), process_group=False)
    assert jd.step(losses_of(model, 0)).weights is not None
