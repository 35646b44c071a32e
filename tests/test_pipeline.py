"""The step pipeline: the phases call the update computer's declared interface, in order; the
GradScaler wrapper (ScaledUpdate) and the routes' wrapper (RoutedUpdate) delegate what they do
not change; the typed communication statistics. Every number is checked against an explicit
computation (``torch.autograd.grad`` per loss), never against the code under test."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import GradVac, GramianWeightedAggregator, UPGrad, Weighting
from jdoptim.amp import LossScaling
from jdoptim.losses import parse_losses
from jdoptim.parameter_plan import plan_parameters
from jdoptim.record import CommunicationStats
from jdoptim.updates.base import UpdateComputer, UpdateResult
from jdoptim.updates.jacobian import JacobianUpdate
from jdoptim.updates.method import RoutedUpdate
from jdoptim.updates.scaled import ScaledUpdate, scaled
from tests._snapshots import same, snapshot


class InverseNormWeighting(Weighting):
    """``wᵢ = 1 / (1 + ‖gᵢ‖²)``: not scale-invariant, so the scaling must be undone before it."""

    def forward(self, gramian: Tensor) -> Tensor:
        return 1.0 / (1.0 + gramian.diagonal())


class Recording(JacobianUpdate):
    """The explicit-Jacobian computer, logging each call of the interface; ``problem`` and
    ``skip`` make ``check`` and ``step_optimizer`` refuse or skip."""

    def __init__(self, problem: str | None = None, skip: str | None = None) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.problem, self.skip = problem, skip

    def agree(self, error: BaseException | None, nonfinite: bool) -> bool:
        self.calls.append("agree")
        return super().agree(error, nonfinite)

    def compute(self, batch, plan, aggregator) -> UpdateResult:  # type: ignore[no-untyped-def]
        self.calls.append("compute")
        return super().compute(batch, plan, aggregator)

    def check(self, result: UpdateResult) -> str | None:
        self.calls.append("check")
        return self.problem

    def step_optimizer(self, optimizer, params) -> str | None:  # type: ignore[no-untyped-def]
        self.calls.append("step_optimizer")
        if self.skip is not None:
            return self.skip
        return super().step_optimizer(optimizer, params)

    def forget_aggregator_sync(self) -> None:
        self.calls.append("forget")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _losses(model: nn.Module, seed: int = 1) -> list[Tensor]:
    generator = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    x = torch.randn(8, 4, generator=generator, dtype=torch.float64).to(dtype)
    out = model(x)
    return [out[:, 0].pow(2).mean(), (out[:, 1] - 1).pow(2).mean()]


def _explicit(model: nn.Module, losses: list[Tensor]) -> Tensor:
    """The Jacobian ``J`` (``m × n``), one ``autograd.grad`` per loss."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def _state(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_phases_call_the_declared_interface_in_order() -> None:
    model, twin = _model(), _model()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    recording = Recording()
    opt._update_computer = recording
    opt.step(_losses(model))
    assert recording.calls == ["agree", "compute", "check", "step_optimizer"]

    twin_opt = JDOptimizer(torch.optim.SGD(twin.parameters(), lr=0.1), UPGrad())
    twin_opt.step(_losses(twin))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)

    opt.load_state_dict(opt.state_dict())
    assert recording.calls[-1] == "forget"


@pytest.mark.parametrize("nonfinite", ["raise", "skip"])
def test_a_problem_found_by_check_refuses_the_step(nonfinite: str) -> None:
    model = _model()
    aggregator = GramianWeightedAggregator(InverseNormWeighting())
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator, nonfinite=nonfinite)  # type: ignore[arg-type]
    opt._update_computer = Recording(problem="test quantity")
    before = _state(model)
    if nonfinite == "raise":
        with pytest.raises(FloatingPointError, match="Non-finite test quantity"):
            opt.step(_losses(model))
    else:
        record = opt.step(_losses(model))
        assert record.skipped and "Non-finite test quantity" in str(record.reason)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_a_step_skipped_by_step_optimizer_restores_the_aggregator() -> None:
    model = _model()
    aggregator = GradVac(beta=0.5)  # stateful: an EMA of the cosine similarities
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), aggregator)
    opt.step(_losses(model, seed=1))  # some state to restore
    before = snapshot(model, opt)
    opt._update_computer = Recording(skip="skipped on purpose")
    opt.zero_grad()
    record = opt.step(_losses(model, seed=2))
    assert record.skipped and record.reason == "skipped on purpose"
    now = snapshot(model, opt)
    for key in ("params", "optimizer", "aggregator"):  # .grad holds the update, as for a scaler
        assert same(now[key], before[key]), key
    opt._update_computer = Recording()
    opt.step(_losses(model, seed=2))  # the same step, not skipped, changes the state
    assert not same(snapshot(model, opt)["aggregator"], before["aggregator"])


def _inputs(model: nn.Module, losses: list[Tensor]):  # type: ignore[no-untyped-def]
    batch = parse_losses(losses, 1)
    return batch, plan_parameters(batch, list(model.parameters()), "all")


def test_scaled_update_sees_unscaled_inputs_and_returns_the_scaled_update() -> None:
    """``compute`` on ``s·ℓ``: the weights are ``W(G)`` of the unscaled Gramian ``G = J Jᵀ``,
    the recorded Gramian is ``G``, the gradients are ``s · wᵀ J`` (unscaled by the scaler)."""
    model = _model()
    losses = _losses(model)
    jacobian = _explicit(model, losses)
    gramian = jacobian @ jacobian.T
    weights = 1.0 / (1.0 + gramian.diagonal())
    scale = 2.0**8
    scaling = LossScaling(torch.amp.GradScaler("cpu", init_scale=scale))
    batch, plan = _inputs(model, losses)
    aggregator = GramianWeightedAggregator(InverseNormWeighting())

    result = ScaledUpdate(JacobianUpdate(), scaling).compute(batch, plan, aggregator)

    torch.testing.assert_close(result.gramian, gramian)
    torch.testing.assert_close(result.weights, weights)
    expected = (scale * weights @ jacobian).split([p.numel() for p in model.parameters()])
    by_param = {id(p): e.view_as(p) for p, e in zip(model.parameters(), expected)}
    assert len(plan.shared) == len(by_param) and not plan.specific
    for param, grad in zip(plan.shared, result.shared_grads):
        torch.testing.assert_close(grad, by_param[id(param)])


def test_scaled_update_turns_an_overflow_into_nan_and_defers_to_the_scaler() -> None:
    model = _model().float()
    losses = _losses(model)
    scaling = LossScaling(torch.amp.GradScaler("cpu", init_scale=3e38))
    batch, plan = _inputs(model, losses)
    computer = ScaledUpdate(JacobianUpdate(), scaling)
    result = computer.compute(batch, plan, UPGrad())
    assert computer.overflow is not None and "Non-finite" in computer.overflow
    assert result.weights is None and result.gramian is None
    grads = result.shared_grads + result.specific_grads
    assert len(grads) == len(list(model.parameters()))
    assert all(bool(g.isnan().all()) for g in grads)
    assert computer.check(result) is None  # the scaler, not the check phase, finds the overflow


def test_wrappers_delegate_what_they_do_not_change() -> None:
    inner = Recording()
    inner.max_loss_dim = 2
    scaling = LossScaling(torch.amp.GradScaler("cpu"))
    for wrapper in (ScaledUpdate(inner, scaling), RoutedUpdate(JacobianUpdate(), inner)):
        assert isinstance(wrapper, UpdateComputer)
        assert wrapper.max_loss_dim == 2 and wrapper.distributed is False
        assert wrapper.agree(None, True) is True
        wrapper.forget_aggregator_sync()
    assert inner.calls == ["agree", "forget", "agree", "forget"]
    routed = RoutedUpdate(JacobianUpdate(), inner)
    assert routed.check(UpdateResult([], [], None, None)) is None
    assert inner.calls[-1] == "check"
    assert scaled(inner, None) is inner
    with pytest.raises(RuntimeError, match="boom"):
        JacobianUpdate().agree(RuntimeError("boom"), False)  # a local computer re-raises


def test_update_result_refuses_untyped_statistics() -> None:
    with pytest.raises(TypeError, match="CommunicationStats"):
        UpdateResult([], [], None, None, {"bytes_sent": 1})  # type: ignore[arg-type]


def test_communication_stats() -> None:
    calls = (
        ("agree", "all_reduce", 6),
        ("signature", "all_gather", 48),
        ("update", "all_gather", 40),
    )
    stats = CommunicationStats(world_size=2, bytes_sent=94, plain_ddp_bytes=188, calls=calls)
    assert stats.all_gathers == 2 and stats.count("all_reduce") == 1 and stats.count("x") == 0
    assert stats.ratio_to_ddp == 0.5
    assert stats.as_extras() == {"bytes_sent": 94, "plain_ddp_bytes": 188, "world_size": 2}
    assert CommunicationStats(1, 0, 0).ratio_to_ddp != CommunicationStats(1, 0, 0).ratio_to_ddp
