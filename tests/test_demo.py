"""The ``python -m jdoptim`` demonstration: its claims, its command line, its outputs."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import pytest
import torch

from jdoptim.demo import methods, multitask, toy
from jdoptim.demo.cli import main
from jdoptim.demo.progress import ProgressBar
from jdoptim.demo.report import format_table


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("seed", [0, 1])
def test_summed_loss_sacrifices_a_task_and_upgrad_does_not(seed):
    problem = multitask.MultiTaskProblem(seed=seed)
    summed = multitask.train(problem, "Sum")
    upgrad = multitask.train(problem, "UPGrad")
    # Same starting point for both.
    assert torch.equal(summed.initial, upgrad.initial)
    assert summed.worsened == ["C"]
    assert summed.final[2] > 1.5 * summed.initial[2]
    assert upgrad.worsened == []
    assert bool((upgrad.final < upgrad.initial).all())
    # The tasks genuinely conflict: some pair of gradients does at (nearly) every step.
    assert summed.conflicted_steps is None and upgrad.conflicted_steps >= 0.9 * 400


def test_the_task_gradients_conflict_in_the_shared_trunk_at_the_start():
    problem = multitask.MultiTaskProblem(seed=0)
    model = problem.model()
    trunk = list(model.trunk.parameters())
    losses = problem.losses(model)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, trunk, retain_graph=True)])
        for loss in losses.values()
    ]
    dots = [rows[i] @ rows[j] for i in range(3) for j in range(i + 1, 3)]
    assert min(dots) < 0


def test_the_plain_run_is_plain_adam_on_the_summed_loss():
    problem = multitask.MultiTaskProblem(seed=0)
    result = multitask.train(problem, "Sum", steps=5)
    model = problem.model()
    adam = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(5):
        for group in adam.param_groups:  # the warm-up over steps // 4 = 1 step: factor 1
            group["lr"] = 5e-3
        adam.zero_grad()
        outputs = model(problem.inputs)
        losses = ((outputs - problem.targets) ** 2).mean(dim=0)
        torch.testing.assert_close(losses.detach(), result.curve[step])
        losses.sum().backward()
        adam.step()
    with torch.no_grad():
        final = ((model(problem.inputs) - problem.targets) ** 2).mean(dim=0)
    torch.testing.assert_close(final, result.final)


def _by_hand(x1: float, x2: float) -> tuple[float, float]:
    c1 = max(math.tanh(x2 / 2), 0.0)
    c2 = max(math.tanh(-x2 / 2), 0.0)
    f1 = math.log(max(abs(0.5 * (-x1 - 7) - math.tanh(-x2)), 5e-6)) + 6
    f2 = math.log(max(abs(0.5 * (-x1 + 3) + math.tanh(-x2) + 2), 5e-6)) + 6
    q1 = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    q2 = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return c1 * f1 + c2 * q1, c1 * f2 + c2 * q2


@pytest.mark.parametrize("point", [(-8.5, 7.5), (0.0, 0.0), (9.0, -1.0), (3.0, -8.4), (-2, 4)])
def test_toy_objectives_are_those_of_the_cagrad_paper(point):
    f1, f2 = toy.objectives(torch.tensor(point, dtype=torch.float64))
    expected = _by_hand(*point)
    assert f1.item() == pytest.approx(expected[0], rel=1e-12, abs=1e-12)
    assert f2.item() == pytest.approx(expected[1], rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("x1", [-6.9, -4.0, 0.0, 3.0, 6.5])
def test_the_toy_pareto_set_is_within_005_of_x2_equal_minus_84(x1):
    # Pareto stationarity: λ∇f₁ + (1-λ)∇f₂ = 0 for some λ ∈ [0, 1]. λ cancels the x₁ components
    # (central differences of the hand-written objectives); the x₂ component of the combination
    # then changes sign between x₂ = PARETO_X2 - 0.05 and PARETO_X2 + 0.05.
    h = 1e-6

    def grad(index: int, x2: float) -> tuple[float, float]:
        d1 = (_by_hand(x1 + h, x2)[index] - _by_hand(x1 - h, x2)[index]) / (2 * h)
        d2 = (_by_hand(x1, x2 + h)[index] - _by_hand(x1, x2 - h)[index]) / (2 * h)
        return d1, d2

    def combined_x2(x2: float) -> float:
        (a1, b1), (a2, b2) = grad(0, x2), grad(1, x2)
        lam = a2 / (a2 - a1)
        assert 0.0 <= lam <= 1.0
        return lam * b1 + (1 - lam) * b2

    assert combined_x2(toy.PARETO_X2 - 0.05) < 0 < combined_x2(toy.PARETO_X2 + 0.05)


def test_toy_distance_to_pareto_set():
    points = torch.tensor([[0.0, -8.4], [9.0, -8.4], [0.0, 0.0], [-10.0, -4.4]])
    expected = torch.tensor([0.0, 2.0, 8.4, 5.0])
    torch.testing.assert_close(toy.distance_to_pareto_set(points), expected)


def test_toy_jd_reaches_the_pareto_set_where_the_summed_loss_does_not():
    starts = ((-8.5, 7.5), (9.0, 9.0))
    summed = toy.optimise("Sum", starts=starts)
    upgrad = toy.optimise("UPGrad", starts=starts)
    assert summed.reached() == [False, False]
    assert upgrad.reached() == [True, True]
    assert upgrad.paths[0].shape == (501, 2)
    torch.testing.assert_close(upgrad.paths[0][0], torch.tensor(starts[0], dtype=torch.float64))


def test_cli_prints_both_tables_quickly():
    out = io.StringIO()
    status = main(["--steps", "12", "--toy-steps", "8", "--methods", "upgrad,MGDA,PCGrad"], out)
    text = out.getvalue()
    assert status == 0
    assert "got worse" in text and "time/step" in text and "reached" in text
    assert "conflicts" in text and "/12" in text
    for method in ("Sum", "UPGrad", "MGDA", "PCGrad"):
        assert sum(line.startswith(method + " ") for line in text.splitlines()) == 2
    assert not any(line.startswith("CAGrad ") for line in text.splitlines())


def test_cli_default_methods_are_known_aggregators():
    for name in methods.DEFAULT_METHODS:
        assert name == methods.BASELINE or name in methods.KNOWN_AGGREGATORS
    for name in methods.KNOWN_AGGREGATORS:
        assert methods.make_aggregator(name) is not methods.make_aggregator(name)


def test_methods_resolve_case_insensitively_and_all():
    assert methods.resolve(["upgrad", "SUM", "UPGrad"]) == ("UPGrad", "Sum")
    assert methods.resolve(["all"]) == methods.available()
    with pytest.raises(ValueError, match="Unknown method 'x'"):
        methods.resolve(["x"])


def test_cli_rejects_unknown_methods(capsys):
    assert main(["--methods", "UPGrad,NoSuchMethod"], io.StringIO()) == 2
    assert "NoSuchMethod" in capsys.readouterr().err


def test_cli_writes_png_plots(tmp_path):
    pytest.importorskip("matplotlib")
    out = io.StringIO()
    args = ["--steps", "6", "--toy-steps", "5", "--methods", "UPGrad", "--plots", str(tmp_path)]
    assert main(args, out) == 0
    for name in ("multitask_losses.png", "toy_trajectories.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_module_entry_point_lists_methods():
    completed = subprocess.run(
        [sys.executable, "-m", "jdoptim", "--list"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    assert completed.stdout.split() == list(methods.available())


def test_progress_bar_writes_one_line_when_not_a_terminal():
    stream = io.StringIO()
    with ProgressBar(10, "work", stream=stream) as bar:
        for _ in range(10):
            bar.update()
    assert stream.getvalue().count("\n") == 1
    assert "10/10" in stream.getvalue()


def test_progress_bar_redraws_in_place_on_a_terminal():
    stream = io.StringIO()
    bar = ProgressBar(4, "work", stream=stream, width=4, force=True)
    bar.update(4)
    bar.close()
    assert stream.getvalue().startswith("\r") and "████ 4/4" in stream.getvalue()


def test_format_table_aligns_columns():
    table = format_table(["a", "bb"], [["xyz", "1"], ["w", "22"]])
    assert table.splitlines() == ["a    bb", "---  --", "xyz   1", "w    22"]
