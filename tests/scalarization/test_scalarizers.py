"""The scalarizers on hand-derived numbers (values and effective weights ∂s/∂ℓ)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

import jdoptim.scalarization._floats as floats_module
from jdoptim.scalarization import (
    COSMOS,
    DWA,
    FAMO,
    IMTLL,
    PBI,
    STCH,
    UW,
    Constant,
    GeometricMean,
    Mean,
    Random,
    Sum,
)

D = torch.float64


def value_and_weights(scalarizer, values: list[float]) -> tuple[float, Tensor]:
    leaf = torch.tensor(values, dtype=D, requires_grad=True)
    out = scalarizer(leaf)
    (grad,) = torch.autograd.grad(out, leaf)
    return out.item(), grad


def close(actual: Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=D))


def test_sum_mean_constant() -> None:
    assert value_and_weights(Sum(), [1, 2, 3])[0] == 6.0
    out, w = value_and_weights(Mean(), [1, 2, 3])
    assert out == 2.0
    close(w, [1 / 3] * 3)
    out, w = value_and_weights(Constant(torch.tensor([0.5, 2.0, -1.0], dtype=D)), [1, 2, 3])
    assert out == pytest.approx(1.5)
    close(w, [0.5, 2.0, -1.0])


def test_geometric_mean() -> None:
    out, w = value_and_weights(GeometricMean(), [1, 2, 4])
    assert out == pytest.approx(2.0)  # 8^(1/3)
    close(w, [2 / 3, 1 / 3, 1 / 6])  # s / (m ℓᵢ)


def test_uw_value_and_gradients() -> None:
    uw = UW(2).double()
    with torch.no_grad():
        uw.log_var.copy_(torch.tensor([0.0, math.log(2.0)]))
    leaf = torch.tensor([2.0, 4.0], dtype=D, requires_grad=True)
    out = uw(leaf)
    assert out.item() == pytest.approx(2.0 + 0.5 * math.log(2.0))
    grad_values, grad_log_var = torch.autograd.grad(out, [leaf, uw.log_var])
    close(grad_values, [0.5, 0.25])  # e^{-s}/2
    close(grad_log_var, [-0.5, -0.5])  # 1/2 − e^{-s} ℓ / 2
    assert uw.learnable_parameters() == [uw.log_var]


def test_imtll_value_and_gradients() -> None:
    imtl = IMTLL(2).double()
    with torch.no_grad():
        imtl.log_scale.copy_(torch.tensor([0.0, math.log(2.0)]))
    leaf = torch.tensor([3.0, 1.0], dtype=D, requires_grad=True)
    out = imtl(leaf)
    assert out.item() == pytest.approx(5.0 - math.log(2.0))
    grad_values, grad_scale = torch.autograd.grad(out, [leaf, imtl.log_scale])
    close(grad_values, [1.0, 2.0])  # e^{s}
    close(grad_scale, [2.0, 1.0])  # e^{s} ℓ − 1


def test_stch() -> None:
    e = math.e
    out, w = value_and_weights(STCH(1.0), [2.0, 4.0])  # y = [1, 2]
    assert out == pytest.approx(2.0 + math.log(1.0 + 1.0 / e))
    close(w, [0.5 / (1 + e), 0.5 * e / (1 + e)])
    ref = torch.tensor([1.0, 1.0], dtype=D)
    out, w = value_and_weights(STCH(0.5, torch.tensor([1.0, 0.0], dtype=D), ref), [3.0, 9.0])
    assert out == pytest.approx(0.5 * math.log(math.exp(4.0) + 1.0))  # y = [2, 0], μ = 0.5
    close(w, [math.exp(4.0) / (math.exp(4.0) + 1.0), 0.0])
    # the bound max ≤ s ≤ max + μ log m, for a tiny μ, without overflow
    out, _ = value_and_weights(STCH(1e-4), [1000.0, 3.0, 999.0])
    assert 1000 / 3 <= out <= 1000 / 3 + 1e-4 * math.log(3.0) + 1e-9  # λ = 1/3


def test_stch_warmup_estimates_the_ideal_point() -> None:
    stch = STCH(1.0, warmup_steps=2)
    out, w = value_and_weights(stch, [3.0, 5.0])
    assert out == pytest.approx(4.0)  # linear during the warm-up: (3 + 5) / 2
    close(w, [0.5, 0.5])
    value_and_weights(stch, [4.0, 2.0])
    assert not stch.warming_up
    close(stch.ideal_point(), [3.0, 2.0])  # running minimum
    out, w = value_and_weights(stch, [3.0, 4.0])  # y = [0, 1]
    assert out == pytest.approx(math.log(1.0 + math.e))
    close(w, [0.5 / (1 + math.e), 0.5 * math.e / (1 + math.e)])


def test_pbi_and_cosmos() -> None:
    out, w = value_and_weights(PBI(2.0, torch.tensor([1.0, 0.0], dtype=D)), [3.0, 4.0])
    assert out == pytest.approx(11.0)  # d₁ = 3, d₂ = 4
    close(w, [1.0, 2.0])
    ref = torch.tensor([1.0, 1.0], dtype=D)
    out, _ = value_and_weights(PBI(1.0, torch.tensor([1.0, 1.0], dtype=D), ref), [3.0, 3.0])
    assert out == pytest.approx(2.0 * math.sqrt(2.0), abs=2e-6)  # on the direction: d₂ ≈ 0
    out, w = value_and_weights(COSMOS(1.0, torch.tensor([1.0, 1.0], dtype=D)), [3.0, 4.0])
    assert out == pytest.approx(7.0 - 7.0 / (5.0 * math.sqrt(2.0)))
    # ∂cos/∂ℓ = r/(‖r‖‖ℓ‖) − cos ℓ/‖ℓ‖²
    cos = 7.0 / (5.0 * math.sqrt(2.0))
    close(
        w,
        [1 - (1 / (5 * math.sqrt(2)) - cos * 3 / 25), 1 - (1 / (5 * math.sqrt(2)) - cos * 4 / 25)],
    )


def test_famo_value_weights_and_update() -> None:
    famo = FAMO(2)
    out, w = value_and_weights(famo, [1.0, 4.0])  # z = [½, ½], c = 1 / (½ + ⅛) = 1.6
    assert out == pytest.approx(1.6 * 0.5 * math.log(4.0), rel=1e-6)
    close(w, [0.8, 0.2])  # c zᵢ / ℓᵢ
    assert famo.pending_update
    famo.update(torch.tensor([0.5, 4.0], dtype=D))  # δ = [log 2, 0]: task 1 fell
    # Adam's first step is lr · sign(gradient); the gradient z ⊙ (δ − zᵀδ) = [+, −] · log 2 / 4
    torch.testing.assert_close(famo.logits.detach(), torch.tensor([-0.025, 0.025]))
    assert not famo.pending_update
    with pytest.raises(ValueError, match="update needs the losses of a call"):
        famo.update(torch.tensor([0.5, 4.0]))


@pytest.mark.parametrize("shape", [(3,), (2, 2)])
def test_famo_refuses_values_at_or_below_their_bounds(shape, famo_update_path) -> None:
    bounds = torch.full(shape, -1.0)
    famo = FAMO(shape, min_losses=bounds)
    famo(torch.full(shape, -0.5))  # above the bounds: fine
    low = torch.full(shape, -0.5)
    low.view(-1)[-1] = -1.0  # one value at its bound: log(0 + ε) is allowed only above it
    with pytest.raises(ValueError, match="lower bound"):
        famo(low - 1e-7)
    assert famo.pending_update  # the refused call left the first call's losses in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_famo_undone_update_restores_its_state_bit_for_bit(dtype, famo_update_path) -> None:
    """The undo that a refused step runs after FAMO's deferred update: logits, Adam's moments
    and step count, and the pending losses are exactly as before, after a first update (no
    Adam state yet) and after later ones."""
    famo = FAMO(3).to(dtype)
    for step in range(3):
        famo(torch.rand(3, dtype=dtype) + 0.5)
        logits = famo.logits.detach().clone()
        adam = {k: v.clone() for k, v in famo._optimizer.state.get(famo.logits, {}).items()}
        pending = famo._previous
        undo = famo._apply_update(torch.rand(3, dtype=dtype) + 0.5)
        assert not torch.equal(famo.logits.detach(), logits)
        undo()
        assert torch.equal(famo.logits.detach(), logits) and famo._previous is pending
        restored = famo._optimizer.state.get(famo.logits, {})
        assert restored.keys() == adam.keys(), step
        assert all(
            torch.equal(restored[k], v) and restored[k].dtype == v.dtype for k, v in adam.items()
        )
        famo.update(torch.rand(3, dtype=dtype) + 0.5)


@pytest.mark.parametrize("shape", [(3,), (2, 2)])
def test_famo_closed_form_weights_are_the_gradient_of_its_scalarization(shape) -> None:
    """``_value_and_weights`` (the optimizer's route: no autograd, in floats) against autograd
    of ``_scalarize`` on the same values, with trained logits and bounds."""
    torch.manual_seed(1)
    famo = FAMO(shape, min_losses=-torch.rand(shape)).double()
    with torch.no_grad():
        famo.logits.copy_(torch.randn(shape))
    values = (torch.rand(shape, dtype=D) + 0.1).requires_grad_()
    expected = famo._scalarize(values)
    (expected_weights,) = torch.autograd.grad(expected, values)
    value, weights = famo._value_and_weights(values)
    torch.testing.assert_close(value, expected.detach())
    torch.testing.assert_close(weights, expected_weights)
    assert not value.requires_grad and not weights.requires_grad
    assert value.dtype == weights.dtype == D and weights.shape == values.shape


def test_dwa_epochs_by_step_and_by_window() -> None:
    lam = [2 * math.exp(0.5) / (math.exp(0.5) + math.exp(0.25))]
    lam.append(2.0 - lam[0])
    for dwa in (DWA(), DWA(window=2)):
        for epoch in ([[2.0, 4.0], [4.0, 8.0]], [[3.0, 3.0], [3.0, 3.0]]):  # averages [3,6], [3,3]
            for values in epoch:
                out, w = value_and_weights(dwa, values)
                close(w, [1.0, 1.0])  # uniform for the first two epochs
            if dwa.window is None:
                dwa.step()
        out, w = value_and_weights(dwa, [1.0, 2.0])  # rates [1, ½], T = 2
        close(w, lam)
        assert out == pytest.approx(lam[0] + 2 * lam[1])
    with pytest.raises(RuntimeError, match="closes its epochs itself"):
        DWA(window=2).step()


def test_random_weights_on_the_simplex_and_seeded() -> None:
    a, b = Random(seed=4), Random(seed=4)
    for _ in range(3):
        _, wa = value_and_weights(a, [1.0, 2.0, 3.0])
        _, wb = value_and_weights(b, [1.0, 2.0, 3.0])
        assert torch.equal(wa, wb) and bool((wa > 0).all())
        assert wa.sum().item() == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("scalarizer", "values", "error", "match"),
    [
        (UW(2), [1.0, 2.0, 3.0], ValueError, "built for values of shape"),
        (IMTLL(3), [1.0, 2.0], ValueError, "built for values of shape"),
        (FAMO(2), [1.0, 2.0, 3.0], ValueError, "built for values of shape"),
        (FAMO(2), [1.0, -2.0], ValueError, "must stay above its lower bound"),
        (GeometricMean(), [1.0, -2.0], ValueError, "non-negative"),
        (Constant(torch.ones(2)), [1.0, 2.0, 3.0], ValueError, "one weight per value"),
        (PBI(1.0, torch.ones(2)), [1.0, 2.0, 3.0], ValueError, "`weights` has shape"),
        (STCH(1.0, reference=torch.ones(2)), [1.0, 2.0, 3.0], ValueError, "`reference`"),
    ],
)
def test_bad_values_are_refused_before_any_state_changes(scalarizer, values, error, match):
    before = {k: v.clone() for k, v in scalarizer.state_dict().items() if isinstance(v, Tensor)}
    with pytest.raises(error, match=match):
        scalarizer(torch.tensor(values))
    after = scalarizer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="mu"):
        STCH(0.0)
    with pytest.raises(ValueError, match="not both"):
        STCH(1.0, reference=torch.zeros(2), warmup_steps=3)
    with pytest.raises(ValueError, match="temperature"):
        DWA(0.0)
    with pytest.raises(ValueError, match="lambda_"):
        COSMOS(-1.0, torch.ones(2))
    with pytest.raises(ValueError, match="theta"):
        PBI(-1.0, torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        FAMO(2, lr=-1.0)
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(2, min_losses=torch.zeros(3))
    with pytest.raises(TypeError, match="stack the losses"):
        Sum()([torch.tensor(1.0)])
    with pytest.raises(TypeError, match="dtype"):
        Sum()(torch.tensor([1, 2]))
    dwa = DWA()
    dwa(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="call reset"):
        dwa(torch.tensor([1.0, 2.0, 3.0]))


def test_dwa_refuses_a_zero_epoch_average_and_keeps_its_state() -> None:
    dwa = DWA()
    dwa(torch.tensor([0.0, 1.0]))
    dwa.step()
    dwa(torch.tensor([1.0, 1.0]))
    state = dwa.get_extra_state()
    with pytest.raises(ValueError, match="undefined"):
        dwa.step()
    after = dwa.get_extra_state()
    assert after["count"] == state["count"] and torch.equal(after["sum"], state["sum"])


def test_reset_returns_to_construction() -> None:
    stch = STCH(1.0, warmup_steps=1)
    stch(torch.tensor([1.0, 2.0]))
    stch.reset()
    assert stch.warming_up and stch.ideal_point() is None
    famo = FAMO(2)
    famo(torch.tensor([1.0, 2.0]))
    famo.update(torch.tensor([0.5, 2.0]))
    famo.reset()
    assert torch.equal(famo.logits.detach(), torch.zeros(2)) and not famo.pending_update


def test_dwa_window_refuses_an_undefined_rate_before_the_call_changes_anything() -> None:
    dwa = DWA(window=1)
    dwa(torch.tensor([0.0, 1.0]))  # closes epoch 1 with the average [0, 1]
    state = dwa.get_extra_state()
    with pytest.raises(ValueError, match="undefined"):
        dwa(torch.tensor([1.0, 1.0]))  # would close epoch 2: rate 1 / 0
    after = dwa.get_extra_state()
    assert after["count"] == state["count"] and after["sum"] is None
    assert len(after["averages"]) == 1 and torch.equal(after["averages"][0], state["averages"][0])


@pytest.fixture(params=["floats", "tensors"])
def famo_update_path(request, monkeypatch) -> str:
    """Both implementations of FAMO's logit update: in Python floats (up to
    ``FLOAT_LIMIT`` logits) and in tensor operations (beyond)."""
    if request.param == "tensors":
        monkeypatch.setattr(floats_module, "FLOAT_LIMIT", 0)
    return request.param


@pytest.mark.parametrize("shape", [(4,), (2, 3)])
@pytest.mark.parametrize("weight_decay", [0.0, 1e-3])
def test_famo_logit_update_is_torch_adam(weight_decay: float, shape, famo_update_path) -> None:
    """FAMO's hand-written Adam step on the logits equals ``torch.optim.Adam`` on the same
    gradients (``∇ = z ⊙ (δ − zᵀδ)``, ``δ = log ℓ − log ℓ'``, ``z`` the softmax over all the
    logits), over several updates, and leaves its state in the Adam's ``state_dict`` format."""
    torch.manual_seed(0)
    famo = FAMO(shape, lr=0.05, weight_decay=weight_decay)
    logits = torch.zeros(shape, requires_grad=True)
    reference = torch.optim.Adam([logits], lr=0.05, weight_decay=weight_decay)
    for _ in range(6):
        before, after = torch.rand(shape) + 0.5, torch.rand(shape) + 0.5
        famo(before)
        famo.update(after)
        z = logits.detach().reshape(-1).softmax(0).reshape(shape)
        delta = before.log() - after.log()
        logits.grad = z * (delta - (z * delta).sum())
        reference.step()
        torch.testing.assert_close(famo.logits.detach(), logits.detach(), rtol=1e-6, atol=1e-7)
    ours = famo._optimizer.state_dict()["state"][0]
    theirs = reference.state_dict()["state"][0]
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-9)
