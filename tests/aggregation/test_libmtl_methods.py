"""GradNorm, IMTL, DB-MTL and MoCo: hand-derived two-loss steps, the papers' formulas on explicit
Jacobians (IMTL-G's D/U form, LibMTL's per-task loops), checkpointing, and JDOptimizer runs
where the method receives the loss values (and GradNorm a layer's Gramian) it declares."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from jdoptim import JDOptimizer
from jdoptim.aggregation import (
    DBMTL,
    IMTL,
    GradNorm,
    GradNormWeighting,
    IMTLWeighting,
    MethodInputs,
    MoCo,
)

D = torch.float64


def test_gradnorm_two_steps_by_hand():
    weighting = GradNormWeighting(alpha=1.5, lr=0.1)
    gramian = torch.diag(torch.tensor([1.0, 9.0], dtype=D))  # norms n = (1, 3)
    first = weighting(MethodInputs(gramian=gramian, losses=torch.tensor([2.0, 1.0], dtype=D)))
    torch.testing.assert_close(first, torch.ones(2, dtype=D))
    # r = (1, 1): target = mean(w n) = 2; sign(w n − 2) n = (−1, 3); w = (1.1, 0.7) → sum 2.
    expected = torch.tensor([1.1, 0.7], dtype=D) * (2 / 1.8)
    torch.testing.assert_close(weighting.loss_weights, expected)
    second = weighting(MethodInputs(gramian=gramian, losses=torch.tensor([1.0, 1.0], dtype=D)))
    torch.testing.assert_close(second, expected)
    # L̃ = (0.5, 1), r = (2/3, 4/3); target = mean(w n) r^1.5.
    w, n = expected, torch.tensor([1.0, 3.0], dtype=D)
    target = (w * n).mean() * torch.tensor([2 / 3, 4 / 3], dtype=D).pow(1.5)
    stepped = w - 0.1 * torch.sign(w * n - target) * n
    torch.testing.assert_close(weighting.loss_weights, stepped * (2 / stepped.sum()))


def test_gradnorm_rejects_non_positive_initial_losses_without_changing_state():
    weighting = GradNormWeighting()
    with pytest.raises(ValueError, match="positive"):
        weighting(MethodInputs(gramian=torch.eye(2, dtype=D), losses=torch.zeros(2, dtype=D)))
    assert weighting.loss_weights is None


def _imtl_g_paper(J: Tensor) -> Tensor:
    """IMTL-G's closed form in the paper's D/U form, on an explicit Jacobian."""
    U = J / J.norm(dim=1, keepdim=True)
    Dm, Um = J[:1] - J[1:], U[:1] - U[1:]
    alpha = J[0] @ Um.T @ torch.linalg.inv(Dm @ Um.T)
    return torch.cat([(1 - alpha.sum()).unsqueeze(0), alpha])


def test_imtl_two_steps_against_the_paper_formulas():
    g = torch.Generator().manual_seed(0)
    weighting = IMTLWeighting(lr=0.2)
    log_scales = torch.zeros(3, dtype=D)
    for _ in range(2):
        J = torch.randn(3, 5, generator=g, dtype=D)
        losses = torch.rand(3, generator=g, dtype=D) + 0.5
        scaled = log_scales.exp().unsqueeze(1) * J  # gradients of e^s ℓ − s
        expected = _imtl_g_paper(scaled) * log_scales.exp()
        got = weighting(MethodInputs(gramian=J @ J.T, losses=losses))
        torch.testing.assert_close(got @ J, expected @ J)
        log_scales = log_scales - 0.2 * (log_scales.exp() * losses - 1)  # ∂(e^s ℓ − s)/∂s
        torch.testing.assert_close(weighting.log_scales, log_scales)


def test_dbmtl_two_steps_by_hand():
    J1 = torch.tensor([[1.0, 0.0], [0.0, 4.0]], dtype=D)
    J2 = torch.tensor([[2.0, 2.0], [0.0, 2.0]], dtype=D)
    l1, l2 = torch.tensor([1.0, 2.0], dtype=D), torch.tensor([2.0, 1.0], dtype=D)
    method = DBMTL(beta=0.5, beta_sigma=1.0, eps=1e-12)
    # Step 1, β₁ = 0.5: Y = ½ ĝ = ½ (1, 0; 0, 2) → norms (½, 1), scales (2, 1): d = (1, 1).
    torch.testing.assert_close(method(MethodInputs(jacobian=J1, losses=l1)), torch.ones(2, dtype=D))
    # Step 2, β₂ = 0.25: ĝ = (1, 1; 0, 2); Y = ĝ + ¼ (Y₁ − ĝ) = (7/8, 3/4; 0, 7/4).
    Y = torch.tensor([[7 / 8, 3 / 4], [0.0, 7 / 4]], dtype=D)
    norms = Y.norm(dim=1)
    expected = (norms.max() / norms) @ Y
    torch.testing.assert_close(method(MethodInputs(jacobian=J2, losses=l2)), expected)


def test_moco_two_steps_by_hand():
    J1 = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=D)
    J2 = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=D)
    l1, l2 = torch.tensor([5.0, 1.0], dtype=D), torch.tensor([1.0, 2.0], dtype=D)
    method = MoCo(beta=0.5, beta_sigma=0.0, gamma=0.2, gamma_sigma=1.0, rho=0.1, eps=1e-12)
    y = torch.zeros(2, 2, dtype=D)
    lam = torch.full((2,), 0.5, dtype=D)
    for t, (J, losses) in enumerate([(J1, l1), (J2, l2)], start=1):
        rows = [losses[i] * J[i] / J[i].norm() for i in range(2)]
        y = torch.stack([y[i] - 0.5 * (y[i] - rows[i]) for i in range(2)])
        grad = (y @ y.T + 0.1 * torch.eye(2, dtype=D)) @ lam
        logits = lam - 0.2 / t * grad
        lam = torch.exp(logits) / torch.exp(logits).sum()
        got = method(MethodInputs(jacobian=J, losses=losses))
        torch.testing.assert_close(got, lam[0] * y[0] + lam[1] * y[1])


@pytest.mark.parametrize(
    "make, call",
    [
        (lambda: DBMTL(beta_sigma=0.5), "jacobian"),
        (lambda: MoCo(), "jacobian"),
        (lambda: IMTL(), "gramian"),
        (lambda: GradNorm(lr=0.3), "gramian"),
    ],
)
def test_state_dict_resumes_the_same_trajectory(make, call):
    g = torch.Generator().manual_seed(1)
    steps = [
        (torch.randn(3, 4, generator=g, dtype=D), torch.rand(3, generator=g, dtype=D) + 0.1)
        for _ in range(5)
    ]

    def run(method, J: Tensor, losses: Tensor) -> Tensor:
        if call == "jacobian":
            return method(MethodInputs(jacobian=J, losses=losses))
        return method.weighting(MethodInputs(gramian=J @ J.T, losses=losses))

    straight = make()
    expected = [run(straight, J, lv) for J, lv in steps]
    first = make()
    for J, lv in steps[:2]:
        run(first, J, lv)
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    for (J, lv), want in zip(steps[2:], expected[2:]):
        torch.testing.assert_close(run(resumed, J, lv), want)
    resumed.reset()
    torch.testing.assert_close(run(resumed, *steps[0]), expected[0])


def test_methods_needing_loss_values_say_so_standalone():
    with pytest.raises(ValueError, match="needs losses"):
        MoCo()(torch.randn(2, 3))
    with pytest.raises(ValueError, match="needs losses"):
        IMTL()(torch.randn(2, 3))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.heads = nn.ModuleList(nn.Linear(3, 1) for _ in range(2))

    def losses(self, seed: int) -> list[Tensor]:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 4, generator=g, dtype=D)
        z = self.trunk(x)
        return [h(z).pow(2).mean() + 0.1 for h in self.heads]


def _rows(losses: list[Tensor], params: list[nn.Parameter]) -> Tensor:
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([gr.flatten() for gr in grads]))
    return torch.stack(rows)


def test_gradnorm_in_jdoptimizer_uses_the_layer_gramian_and_the_loss_values():
    torch.manual_seed(0)
    model = Net().double()
    layer = list(model.trunk[2].parameters())
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), GradNorm(lr=0.1, layer=layer))
    reference = GradNormWeighting(lr=0.1)  # fed the explicit layer Gramian by hand
    for seed in range(3):
        losses = model.losses(seed)
        rows = _rows(losses, layer)
        values = torch.stack([loss.detach() for loss in losses])
        expected = reference(MethodInputs(gramian=rows @ rows.T, losses=values))
        opt.zero_grad()
        opt.step(losses)
        torch.testing.assert_close(opt.last_record.weights, expected)


def test_dbmtl_in_jdoptimizer_gives_the_aggregated_update_to_the_trunk():
    torch.manual_seed(0)
    model = Net().double()
    trunk = list(model.trunk.parameters())
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), DBMTL())
    reference = DBMTL()
    for seed in range(2):
        losses = model.losses(seed)
        J = _rows(losses, trunk)
        values = torch.stack([loss.detach() for loss in losses])
        expected = reference(MethodInputs(jacobian=J, losses=values))
        opt.zero_grad()
        opt.step(losses)
        got = torch.cat([p.grad.flatten() for p in trunk])
        torch.testing.assert_close(got, expected)
    assert math.isfinite(float(got.norm()))


@pytest.mark.parametrize(
    "make", [lambda m: IMTL(lr=0.3), lambda m: GradNorm(lr=0.2, layer=m.trunk[2]), lambda m: MoCo()]
)
def test_jdoptimizer_checkpoint_resumes_the_same_trajectory(make):
    """The method's state travels in JDOptimizer.state_dict(): resuming from a checkpoint taken
    after two steps gives the parameters of four uninterrupted steps."""

    def build() -> tuple[Net, JDOptimizer]:
        torch.manual_seed(0)
        model = Net().double()
        return model, JDOptimizer(torch.optim.Adam(model.parameters(), lr=0.05), make(model))

    straight_model, straight = build()
    for seed in range(4):
        straight.zero_grad()
        straight.step(straight_model.losses(seed))

    model, opt = build()
    for seed in range(2):
        opt.zero_grad()
        opt.step(model.losses(seed))
    checkpoint = {"model": model.state_dict(), "opt": opt.state_dict()}
    resumed_model, resumed = build()
    resumed_model.load_state_dict(checkpoint["model"])
    resumed.load_state_dict(checkpoint["opt"])
    for seed in range(2, 4):
        resumed.zero_grad()
        resumed.step(resumed_model.losses(seed))
    for p, q in zip(resumed_model.parameters(), straight_model.parameters()):
        torch.testing.assert_close(p, q)


def test_outputs_have_no_grad_fn():
    J = torch.randn(3, 4, dtype=D, requires_grad=True)
    G = (J @ J.T).detach().requires_grad_()
    values = torch.rand(3, dtype=D) + 0.5
    assert DBMTL()(MethodInputs(jacobian=J, losses=values)).grad_fn is None
    assert MoCo()(MethodInputs(jacobian=J, losses=values)).grad_fn is None
    assert IMTLWeighting()(MethodInputs(gramian=G, losses=values)).grad_fn is None
    assert GradNormWeighting()(MethodInputs(gramian=G, losses=values)).grad_fn is None


@pytest.mark.parametrize(
    "make",
    [lambda m: IMTL(), lambda m: GradNorm(layer=m.trunk[2])],
    ids=["IMTL", "GradNorm-layer"],
)
def test_engine_path_gives_the_jacobian_path_trajectory(make):
    """With modules= (the Gramian engine) the bound loss values and layer Gramian reach the
    method as on the explicit-Jacobian path: three steps end at the same parameters."""
    ends = []
    for hooked in (False, True):
        torch.manual_seed(0)
        model = Net().double()
        opt = JDOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            make(model),
            modules=model if hooked else None,
        )
        for seed in range(3):
            opt.zero_grad()
            opt.step(model.losses(seed))
        ends.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(ends[0], ends[1])
