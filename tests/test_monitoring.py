"""Monitoring from the step record, checked against explicit per-loss gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jdoptim import JDOptimizer, monitoring
from jdoptim.aggregation import MGDA, GradDrop, UPGrad
from jdoptim.monitoring import History, plot_history, summarize


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(7, 1) for _ in range(3))

    def forward(self, x):
        z = self.trunk(x)
        return [head(z).squeeze(1) for head in self.heads]


def _losses(model, x, y):
    outs = model(x)
    # Targets of opposite signs make some gradients conflict.
    return [(o - s * y).pow(2).mean() for o, s in zip(outs, (1.0, -1.0, 0.5))]


def _explicit_jacobian(model, x, y) -> torch.Tensor:
    shared = list(model.trunk.parameters())
    rows = []
    for loss in _losses(model, x, y):
        grads = torch.autograd.grad(loss, shared, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize("aggregator", [UPGrad(), MGDA()])
def test_monitoring_matches_explicit_gradients(aggregator):
    model = TwoHeads().double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    jacobian = _explicit_jacobian(model, x, y)
    before = torch.cat([p.detach().reshape(-1) for p in model.trunk.parameters()])

    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), aggregator)
    record = opt.step(_losses(model, x, y))

    after = torch.cat([p.detach().reshape(-1) for p in model.trunk.parameters()])
    update = before - after  # SGD with lr=1: the parameters moved by -d
    m = jacobian.shape[0]
    cosines = torch.stack(
        [
            torch.stack(
                [nn.functional.cosine_similarity(jacobian[i], jacobian[j], dim=0) for j in range(m)]
            )
            for i in range(m)
        ]
    )
    torch.testing.assert_close(record.cosine_similarities, cosines)
    dots = jacobian @ jacobian.T
    assert record.conflicting_pairs == sum(
        int(dots[i, j] < 0) for i in range(m) for j in range(i + 1, m)
    )
    assert record.conflicting_pairs >= 1
    torch.testing.assert_close(record.update_norm, update.norm())
    torch.testing.assert_close(record.directional_derivatives, jacobian @ update)


def test_zero_gradient_gives_zero_cosines_not_nan():
    gramian = torch.tensor([[4.0, 0.0, -2.0], [0.0, 0.0, 0.0], [-2.0, 0.0, 1.0]])
    expected = torch.tensor([[1.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-1.0, 0.0, 1.0]])
    torch.testing.assert_close(monitoring.cosine_similarities(gramian), expected)
    assert monitoring.conflicting_pairs(gramian) == 1


def test_closed_forms():
    # g1 = (1, 0), g2 = (0, 2): orthogonal; d = 1·g1 + 0.5·g2 = (1, 1).
    gramian = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    weights = torch.tensor([1.0, 0.5])
    torch.testing.assert_close(monitoring.update_norm(gramian, weights), torch.tensor(2.0).sqrt())
    torch.testing.assert_close(
        monitoring.directional_derivatives(gramian, weights), torch.tensor([1.0, 2.0])
    )
    assert monitoring.conflicting_pairs(gramian) == 0


def test_non_gramian_aggregator_has_cosines_but_no_update_quantities():
    model = TwoHeads()
    x, y = torch.randn(16, 5), torch.randn(16)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), GradDrop())
    record = opt.step(_losses(model, x, y))
    assert record.weights is None
    assert record.update_norm is None and record.directional_derivatives is None
    assert record.cosine_similarities.shape == (3, 3)
    assert "update_norm" not in summarize(record)


def test_nothing_is_computed_unless_asked(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("computed without being asked")

    for name in (
        "cosine_similarities",
        "conflicting_pairs",
        "update_norm",
        "directional_derivatives",
    ):
        monkeypatch.setattr(monitoring, name, forbidden)
    model = TwoHeads()
    x, y = torch.randn(16, 5), torch.randn(16)
    opt = JDOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), UPGrad())
    record = opt.step(_losses(model, x, y))
    with pytest.raises(AssertionError, match="without being asked"):
        record.cosine_similarities  # noqa: B018


def test_history_keeps_plain_numbers_and_plots(tmp_path):
    model = TwoHeads()
    x, y = torch.randn(16, 5), torch.randn(16)
    opt = JDOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), UPGrad())
    history, records = History(), []
    for _ in range(4):
        record = opt.step(_losses(model, x, y))
        opt.zero_grad()
        history.append(record)
        records.append(record)
    assert len(history) == 4 and history.names == records[0].names
    for k, record in enumerate(records):
        assert history.losses[k] == record.losses.tolist()
        assert history.weights[k] == record.weights.tolist()
        assert history.conflicting_pairs[k] == record.conflicting_pairs
        assert history.update_norm[k] == pytest.approx(float(record.update_norm))
        off_diagonal = record.cosine_similarities[~torch.eye(3, dtype=torch.bool)]
        assert history.min_cosine[k] == pytest.approx(float(off_diagonal.min()))
    pytest.importorskip("matplotlib")
    path = tmp_path / "run.png"
    figure = plot_history(history, path)
    assert path.read_bytes()[:4] == b"\x89PNG"
    # Or straight from the records: the same curves.
    from_records = plot_history(records)
    for ax, other in zip(figure.axes, from_records.axes):
        for line, other_line in zip(ax.get_lines(), other.get_lines()):
            assert list(line.get_ydata()) == pytest.approx(
                list(other_line.get_ydata()), nan_ok=True
            )
    assert len(figure.axes[0].get_lines()) == 3  # one loss curve per task
    import matplotlib.pyplot as plt

    plt.close("all")
