import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from jdoptim import autojac
from jdoptim.autojac import JacobianComputer, compute_jacobian


def _model_and_jacrev():
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(4, 5)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())

    def losses_of(p):
        out = functional_call(model, p, (x,))
        return torch.stack([out[:, 0].pow(2).mean(), out[:, 1].sin().sum(), out[:, 2].mean()])

    reference = jacrev(losses_of)({k: v.detach() for k, v in params.items()})
    return model, x, [reference[n] for n in names]


@pytest.mark.parametrize("use_vmap", [True, False])
def test_jacobian_equals_jacrev(use_vmap):
    model, x, expected = _model_and_jacrev()
    out = model(x)
    losses = torch.stack([out[:, 0].pow(2).mean(), out[:, 1].sin().sum(), out[:, 2].mean()])
    blocks = compute_jacobian(losses, list(model.parameters()), use_vmap=use_vmap)
    for block, reference in zip(blocks, expected):
        torch.testing.assert_close(block, reference)


def test_falls_back_to_a_loop_when_vmap_cannot_run(monkeypatch):
    model, x, expected = _model_and_jacrev()

    def refuse(*args, **kwargs):
        raise RuntimeError("Batching rule not implemented for aten::something")

    monkeypatch.setattr(autojac, "_jacobian_by_vmap", refuse)
    computer = JacobianComputer()
    out = model(x)
    losses = torch.stack([out[:, 0].pow(2).mean(), out[:, 1].sin().sum(), out[:, 2].mean()])
    blocks = computer.compute(losses, list(model.parameters()))
    assert computer.vmap_works is False
    for block, reference in zip(blocks, expected):
        torch.testing.assert_close(block, reference)


def test_unreached_inputs_get_zero_rows_and_a_single_loss_works():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    losses = torch.stack([a.pow(2).sum(), a.sum()])
    block_a, block_b = compute_jacobian(losses, [a, b])
    torch.testing.assert_close(block_a, torch.stack([2 * a.detach(), torch.ones(3)]))
    assert torch.equal(block_b, torch.zeros(2, 2))
    (single,) = compute_jacobian(a.pow(3).sum().reshape(1), [a])
    torch.testing.assert_close(single, 3 * a.detach().pow(2).unsqueeze(0))


def test_a_donated_buffer_error_names_the_fix(monkeypatch):
    def donated(*args, **kwargs):
        raise RuntimeError(
            "This backward function was compiled with non-empty donated buffers which requires "
            "create_graph=False and retain_graph=False."
        )

    monkeypatch.setattr(autojac, "_jacobian_by_vmap", donated)
    monkeypatch.setattr(autojac, "_jacobian_by_loop", donated)
    p = nn.Parameter(torch.randn(3))
    losses = torch.stack([p.sum(), p.pow(2).sum()])
    with pytest.raises(RuntimeError, match=r"donated_buffer = False") as info:
        JacobianComputer().compute(losses, [p])
    assert "donated buffers" in str(info.value.__cause__)
