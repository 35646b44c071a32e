"""Bad input: a clear error naming the problem and the fix, and nothing changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import GramianWeightedAggregator, UPGrad, Weighting
from tests.models import MultiTaskMLP, task_losses


class NaNWeighting(Weighting):
    def forward(self, gramian: Tensor) -> Tensor:
        return torch.full((gramian.shape[0],), float("nan"))


def _trained_setup():
    """A model and an Adam-backed JDOptimizer with non-trivial state and .grad values."""
    model = MultiTaskMLP(n_tasks=2)
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), UPGrad())
    x, y = torch.randn(8, 6), torch.randn(8, 2)
    for _ in range(2):
        opt.zero_grad()
        opt.step(task_losses(model, x, y))
    return model, opt, x, y


def _snapshot(model: nn.Module, opt: JDOptimizer):
    params = [p.detach().clone() for p in model.parameters()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    return params, grads, copy.deepcopy(opt.state_dict())


def _assert_unchanged(model, opt, snapshot):
    params, grads, state = snapshot
    for p, before, grad in zip(model.parameters(), params, grads):
        assert torch.equal(p, before)
        assert (p.grad is None) == (grad is None)
        if grad is not None:
            assert torch.equal(p.grad, grad)
    now = opt.state_dict()
    assert now["param_groups"] == state["param_groups"]
    for key, entry in state["state"].items():
        for name, value in entry.items():
            assert torch.equal(torch.as_tensor(now["state"][key][name]), torch.as_tensor(value))


def _cases(model, x, y):
    l1, l2 = task_losses(model, x, y)
    foreign = nn.Linear(6, 1)
    with torch.no_grad():
        frozen = model(x)[0].mean()
    return {
        "empty list": ([], ValueError, "no losses"),
        "empty tensor": (torch.zeros(0, requires_grad=True), ValueError, "empty"),
        "not a tensor": ([l1, 0.5], TypeError, r"loss\[1\] is a float"),
        "non-scalar": ([l1, (model(x)[1] - y[:, 1]).pow(2)], ValueError, r"loss\[1\] has shape"),
        "no graph": ([l1, frozen], ValueError, r"loss\[1\] has no autograd graph"),
        "integer loss": ([l1, torch.tensor(3)], TypeError, "floating-point"),
        "matrix": (torch.stack([l1, l2]).reshape(1, 2), ValueError, "1-D"),
        "not a loss container": ("loss", TypeError, "list of scalar loss"),
        "nothing owned": ([foreign(x).mean(), foreign(x).pow(2).mean()], ValueError, "none of"),
        "nan loss": ({"depth": l1, "seg": l2 * float("nan")}, FloatingPointError, "seg"),
        "inf loss": ([l1 * float("inf"), l2], FloatingPointError, r"loss\[0\]"),
        "different devices": (
            [l1, torch.zeros((), device="meta", requires_grad=True) * 2],
            ValueError,
            "different devices",
        ),
    }


CASE_NAMES = list(_cases(MultiTaskMLP(2), torch.randn(2, 6), torch.randn(2, 2)))


@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_input_raises_a_clear_error_and_changes_nothing(case):
    model, opt, x, y = _trained_setup()
    losses, error, message = _cases(model, x, y)[case]
    snapshot = _snapshot(model, opt)
    with pytest.raises(error, match=message):
        opt.step(losses)
    _assert_unchanged(model, opt, snapshot)


def test_nonfinite_weights_raise_and_change_nothing():
    model, opt, x, y = _trained_setup()
    opt.aggregator = GramianWeightedAggregator(NaNWeighting())
    snapshot = _snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="aggregation weights"):
        opt.step(task_losses(model, x, y))
    _assert_unchanged(model, opt, snapshot)


def test_skip_mode_skips_the_step_and_says_why():
    model, opt, x, y = _trained_setup()
    opt.nonfinite = "skip"
    snapshot = _snapshot(model, opt)
    l1, l2 = task_losses(model, x, y)
    record = opt.step({"a": l1, "b": l2 / 0.0 * 0.0})
    assert record.skipped and "b" in record.reason
    _assert_unchanged(model, opt, snapshot)
    opt.aggregator = GramianWeightedAggregator(NaNWeighting())
    record = opt.step(task_losses(model, x, y))
    assert record.skipped and "weights" in record.reason
    _assert_unchanged(model, opt, snapshot)


def test_missing_losses_name_the_new_call():
    _, opt, _, _ = _trained_setup()
    with pytest.raises(TypeError, match=r"opt.step\(\[loss1"):
        opt.step()


def test_a_non_finite_specific_gradient_is_caught_with_finite_losses():
    # sqrt'(0) = inf: the loss is finite, the head's own gradient is not.
    model, opt, x, y = _trained_setup()
    snapshot = _snapshot(model, opt)
    l1, l2 = task_losses(model, x, y)
    head_only = model.heads[1].bias.sub(model.heads[1].bias.detach()).abs().sqrt().sum()
    with pytest.raises(FloatingPointError, match="aggregated gradient"):
        opt.step([l1, l2 + head_only])
    _assert_unchanged(model, opt, snapshot)


def test_a_non_finite_jacobian_is_caught_through_the_gramian():
    model, opt, x, y = _trained_setup()
    snapshot = _snapshot(model, opt)
    l1, l2 = task_losses(model, x, y)
    w = model.trunk[0].bias
    trunk_nan = (w - w.detach()).abs().sqrt().sum()  # infinite gradient on a shared parameter
    with pytest.raises(FloatingPointError, match="Gramian"):
        opt.step([l1 + trunk_nan, l2])
    _assert_unchanged(model, opt, snapshot)


def test_skip_mode_also_skips_a_non_finite_jacobian():
    model, opt, x, y = _trained_setup()
    opt.nonfinite = "skip"
    snapshot = _snapshot(model, opt)
    l1, l2 = task_losses(model, x, y)
    w = model.trunk[0].bias
    record = opt.step([l1 + (w - w.detach()).abs().sqrt().sum(), l2])
    assert record.skipped and "Gramian" in record.reason
    _assert_unchanged(model, opt, snapshot)


def test_finiteness_check_of_gradients_handles_every_case():
    """The fused check behind the non-finite-gradient refusal: NaN and ±inf anywhere are caught,
    huge finite values (whose squared norm would overflow) are not, empty tensors are skipped,
    and mixed dtypes take the per-tensor path."""
    from jdoptim.linalg.finite import all_finite

    nan, inf = float("nan"), float("inf")
    assert all_finite([torch.ones(3), torch.zeros(0), torch.full((2, 2), 3e38)])
    assert all_finite([torch.zeros(0)])
    assert not all_finite([torch.ones(3), torch.tensor([1.0, nan])])
    assert not all_finite([torch.tensor([-inf]), torch.ones(1)])
    assert not all_finite([torch.ones(2, dtype=torch.float16), torch.tensor([inf])])
    assert all_finite([torch.ones(2, dtype=torch.float16), torch.ones(2, dtype=torch.float64)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finiteness_check_by_sum_is_exact(dtype):
    """``is_finite`` decides from the sum when it can: a NaN or ±inf entry anywhere (alone, with
    the opposite infinity, among huge values) is caught, and finite entries whose sum overflows
    (or cancels to zero) are still reported finite, by the entry-wise check."""
    from jdoptim.linalg.finite import is_finite

    big = torch.finfo(dtype).max
    nan, inf = float("nan"), float("inf")
    assert is_finite(torch.ones(5, dtype=dtype))
    assert is_finite(torch.zeros(0, dtype=dtype))
    assert is_finite(torch.full((3, 3), big, dtype=dtype))  # the sum overflows
    assert is_finite(torch.tensor([big, -big, big, -big], dtype=dtype))
    for bad in ([1.0, nan], [inf, 1.0], [-inf, 2.0], [inf, -inf], [big, big, nan]):
        assert not is_finite(torch.tensor(bad, dtype=dtype))
    assert not is_finite(torch.tensor([[1.0, 2.0], [inf, 3.0]], dtype=dtype))
    gramian = torch.ones(2, 2, requires_grad=True) * 2.0  # a tensor with a graph is accepted
    assert is_finite(gramian)


def test_finiteness_check_of_finite_values_is_one_reduction():
    """The point of ``is_finite``: on finite values it dispatches one sum and one read-back, not
    the five operations of ``torch.isfinite(x).all()`` (counted, not timed)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from jdoptim.linalg.finite import is_finite

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    values = torch.randn(16)
    with Recorder() as recorder:
        assert is_finite(values)
    assert [op.split(".")[0] for op in recorder.ops] == ["sum", "_local_scalar_dense"]
    bad = torch.tensor([1.0, float("nan")])
    with Recorder() as recorder:
        assert not is_finite(bad)
    assert len(recorder.ops) > 2  # a non-finite sum goes on to the entry-wise test
