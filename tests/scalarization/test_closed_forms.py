"""The scalarizers' closed-form value and effective weights (``_value_and_weights``, the
optimizer's route: no autograd node of the method) against autograd of ``_scalarize`` on the
same values and state, in both of its routes (Python floats up to ``FLOAT_LIMIT`` values, and
beyond), and through ``JDOptimizer`` against a step that differentiates ``_scalarize``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

import jdoptim.scalarization as S
import jdoptim.scalarization._floats as floats_module
from jdoptim import JDOptimizer

D = torch.float64


def _values(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=D) * 3.0 + 0.05


def _preference(shape: tuple[int, ...], seed: int) -> Tensor:
    g = torch.Generator().manual_seed(100 + seed)
    return torch.rand(shape, generator=g, dtype=D) + 0.05


def _trained_famo(shape: tuple[int, ...], seed: int) -> S.FAMO:
    famo = S.FAMO(shape, min_losses=-_preference(shape, seed)).double()
    with torch.no_grad():
        famo.logits.copy_(torch.randn(shape, generator=torch.Generator().manual_seed(seed)))
    return famo


def _stch_after_warmup(shape: tuple[int, ...], seed: int) -> S.STCH:
    stch = S.STCH(0.3, _preference(shape, seed), warmup_steps=2)
    for k in range(2):
        stch(_values(shape, 50 + k))
    return stch


def _trained(scalarizer: S.Scalarizer, seed: int) -> S.Scalarizer:
    """``scalarizer`` with random (trained-looking) learnable parameters."""
    with torch.no_grad():
        for parameter in scalarizer.learnable_parameters():
            g = torch.Generator().manual_seed(seed)
            parameter.copy_(torch.randn(parameter.shape, generator=g))
    return scalarizer


FACTORIES: dict[str, Callable[[tuple[int, ...], int], S.Scalarizer]] = {
    "GeometricMean": lambda shape, seed: S.GeometricMean(),
    "PBI": lambda shape, seed: S.PBI(5.0, _preference(shape, seed)),
    "PBI with reference": lambda shape, seed: S.PBI(
        0.5, _preference(shape, seed), -_preference(shape, seed + 1)
    ),
    "UW": lambda shape, seed: _trained(S.UW(shape).double(), seed),
    "UW in float32": lambda shape, seed: _trained(S.UW(shape), seed),
    "IMTLL": lambda shape, seed: _trained(S.IMTLL(shape).double(), seed),
    "FAMO": _trained_famo,
    "COSMOS": lambda shape, seed: S.COSMOS(0.7, _preference(shape, seed)),
    "COSMOS lambda 0": lambda shape, seed: S.COSMOS(0.0, _preference(shape, seed)),
    "STCH": lambda shape, seed: S.STCH(0.2),
    "STCH weights and reference": lambda shape, seed: S.STCH(
        0.05, _preference(shape, seed), -_preference(shape, seed + 1)
    ),
    "STCH warming up": lambda shape, seed: S.STCH(0.3, warmup_steps=3),
    "STCH after warm-up": _stch_after_warmup,
}


@pytest.mark.parametrize("shape", [(1,), (3,), (2, 3)])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_closed_form_is_the_gradient_of_the_scalarization(name, seed, shape) -> None:
    scalarizer = FACTORIES[name](shape, seed)
    values = _values(shape, seed).requires_grad_()
    learned = scalarizer.learnable_parameters()
    expected = scalarizer._scalarize(values)
    expected_weights, *expected_learned = torch.autograd.grad(expected, [values, *learned])
    closed = scalarizer._value_and_weights(values)
    assert closed is not None  # (None only where a formula is undefined: tested below)
    value, weights = closed
    # A float32 parameter's exp is rounded in float32 by autograd's route, not by the floats'
    single = any(p.dtype == torch.float32 for p in learned)
    tolerance = {"rtol": 1e-6, "atol": 1e-6} if single else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(value, expected.detach(), **tolerance)
    torch.testing.assert_close(weights, expected_weights, **tolerance)
    assert value.dtype == weights.dtype == D and weights.shape == values.shape
    assert value.dim() == 0 and not weights.requires_grad
    grads = scalarizer._learned_gradients(values) if learned else []
    assert grads is not None and len(grads) == len(learned)
    for grad, reference, parameter in zip(grads, expected_learned, learned):
        assert grad.dtype == parameter.dtype and grad.shape == parameter.shape
        torch.testing.assert_close(grad, reference, rtol=1e-6, atol=1e-6)


def test_undefined_closed_forms_are_left_to_autograd() -> None:
    """A zero loss in GeometricMean (undefined weight) and a zero PBI preference: ``None``."""
    assert S.GeometricMean()._value_and_weights(torch.tensor([0.0, 2.0], dtype=D)) is None
    pbi = S.PBI(1.0, torch.zeros(2, dtype=D))
    assert pbi._value_and_weights(torch.ones(2, dtype=D)) is None


def test_cosmos_near_zero_norm_is_left_to_autograd() -> None:
    """Below a norm of 1e-6 the cosine's clamping decides the gradient: no closed form."""
    cosmos = S.COSMOS(0.5, torch.tensor([1.0, 2.0], dtype=D))
    assert cosmos._value_and_weights(torch.tensor([1e-9, 0.0], dtype=D)) is None
    assert S.COSMOS(0.5, torch.zeros(2, dtype=D))._value_and_weights(torch.ones(2, dtype=D)) is None


class _Heads(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(4, 5)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 1) for _ in range(3))

    def forward(self, x: Tensor) -> list[Tensor]:
        z = torch.tanh(self.trunk(x))
        return [head(z).pow(2).mean() + 0.1 for head in self.heads]


class _AutogradOnly(S.Scalarizer):
    """``scalarizer`` without its closed form: the step differentiates ``_scalarize``."""

    def __init__(self, scalarizer: S.Scalarizer) -> None:
        super().__init__()
        self.inner = scalarizer

    def _check(self, values: Tensor) -> None:
        self.inner._check(values)

    def _scalarize(self, values: Tensor) -> Tensor:
        return self.inner._scalarize(values)

    def _observe(self, values: Tensor) -> None:
        self.inner._observe(values)

    def learnable_parameters(self) -> list[torch.nn.Parameter]:
        return self.inner.learnable_parameters()


@pytest.mark.parametrize(
    "name",
    ["COSMOS", "STCH after warm-up", "STCH warming up", "UW", "IMTLL", "PBI", "GeometricMean"],
)  # (FAMO's step, with its logit updates, is checked against TorchJD's in test_scalarized_step)
def test_step_with_the_closed_form_is_the_step_that_differentiates(name) -> None:
    """Three steps of ``JDOptimizer(SGD, method)``: parameters (the method's learnable ones
    included), ``.grad`` and the recorded weights equal those of the same method stepped
    through autograd."""
    torch.manual_seed(0)
    models = [_Heads().double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    methods = [FACTORIES[name]((3,), 0), _AutogradOnly(FACTORIES[name]((3,), 0))]
    optimizers = [
        JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
        for model, method in zip(models, methods)
    ]
    for step in range(3):
        x = torch.randn(8, 4, dtype=D, generator=torch.Generator().manual_seed(step))
        records = [opt.step(model(x)) for model, opt in zip(models, optimizers)]
        torch.testing.assert_close(records[0].weights, records[1].weights)
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            torch.testing.assert_close(p, q)
            torch.testing.assert_close(p.grad, q.grad)
        for p, q in zip(methods[0].learnable_parameters(), methods[1].learnable_parameters()):
            torch.testing.assert_close(p, q)


@pytest.mark.parametrize("name", ["COSMOS", "UW", "FAMO"])
def test_above_the_float_limit_the_step_takes_autograd(name, monkeypatch) -> None:
    """More losses than ``FLOAT_LIMIT``: no closed form (the step differentiates
    ``_scalarize``), and the same update as through the closed form."""
    grads = []
    for limit in (floats_module.FLOAT_LIMIT, 2):
        monkeypatch.setattr(floats_module, "FLOAT_LIMIT", limit)
        torch.manual_seed(0)
        model, method = _Heads().double(), FACTORIES[name]((3,), 0)
        opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
        losses = torch.stack(model(torch.randn(8, 4, dtype=D)))
        closed = opt._scalarized._closed_form(losses.detach(), method.learnable_parameters())
        assert (closed is None) == (limit == 2)
        record = opt.step(list(losses))
        grads.append((record.weights, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for p, q in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize(
    ("make", "huge"),
    [(lambda: S.UW(3).double(), -1000.0), (lambda: S.IMTLL(3).double(), 1000.0)],
)
def test_weights_that_overflow_are_refused_and_change_nothing(make, huge) -> None:
    """A learnable log-scale whose exp overflows: ``math.exp`` raises where ``torch.exp`` gives
    ``inf``; the step takes autograd's route and refuses the infinite weight by name."""
    torch.manual_seed(0)
    model, method = _Heads().double(), make()
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), method)
    with torch.no_grad():
        method.learnable_parameters()[0].fill_(huge)
    before = [p.detach().clone() for p in [*model.parameters(), *method.parameters()]]
    with pytest.raises(FloatingPointError, match="Non-finite effective weight"):
        opt.step(model(torch.randn(8, 4, dtype=D)))
    after = [*model.parameters(), *method.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(before, after))
    assert all(p.grad is None for p in model.parameters())


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["FAMO", "UW", "STCH after warm-up", "COSMOS"])
def test_closed_forms_on_each_device(name, device) -> None:
    """The closed form's tensors (made on the CPU from floats, then moved) land on the values'
    device, and equal autograd's weights there; on CUDA, run by benchmarks/device_check.sh."""
    scalarizer = FACTORIES[name]((3,), 0).to(device)
    values = _values((3,), 0).to(device).requires_grad_()
    (expected,) = torch.autograd.grad(scalarizer._scalarize(values), values)
    closed = scalarizer._value_and_weights(values)
    assert closed is not None
    value, weights = closed
    assert value.device == weights.device == values.device
    torch.testing.assert_close(weights, expected, rtol=1e-12, atol=1e-12)
    for grad, parameter in zip(
        scalarizer._learned_gradients(values) or [], scalarizer.learnable_parameters()
    ):
        assert grad.device == parameter.device
