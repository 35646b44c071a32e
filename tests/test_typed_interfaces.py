"""Errors of the interfaces made explicit for the type checker (``mypy jdoptim``): a method that
needs its layer's Gramian without naming the layer, and a grad_scaler without a GradScaler's
methods, are refused with a clear error and change nothing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import GramianWeightedAggregator, UPGrad
from jdoptim.aggregation._inputs import InputWeighting, MethodInputs


class _LayerlessWeighting(InputWeighting):
    """Declares that it needs ``layer_gramian`` but has no ``layer_params()``."""

    needs = frozenset({"gramian", "layer_gramian"})

    def forward(self, inputs: MethodInputs) -> Tensor:
        return torch.ones(inputs.gramian.shape[0], dtype=inputs.gramian.dtype)


def _setup() -> tuple[nn.Module, JDOptimizer, list[Tensor]]:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    adam = torch.optim.Adam(model.parameters(), lr=0.1)
    opt = JDOptimizer(adam, GramianWeightedAggregator(_LayerlessWeighting()))
    out = model(torch.randn(4, 3))
    return model, opt, [out[:, 0].pow(2).mean(), out[:, 1].pow(2).mean()]


def test_a_method_needing_its_layer_gramian_must_name_its_layer() -> None:
    model, opt, losses = _setup()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"_LayerlessWeighting.*layer_gramian.*layer_params\(\)"):
        opt.step(losses)
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old) and p.grad is None
    assert opt.optimizer.state_dict()["state"] == {}


class _NotQuiteAScaler:
    """``scale``, ``get_scale`` and ``step`` but no ``is_enabled``."""

    def scale(self, outputs: Tensor) -> Tensor:
        return outputs

    def get_scale(self) -> float:
        return 1.0

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()


def test_a_grad_scaler_without_a_grad_scalers_methods_is_refused() -> None:
    model = nn.Linear(3, 2)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    out = model(torch.randn(4, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch\.amp\.GradScaler"):
        opt.step([out[:, 0].sum(), out[:, 1].sum()], grad_scaler=_NotQuiteAScaler())
    for p, old in zip(model.parameters(), before):
        assert torch.equal(p, old) and p.grad is None
