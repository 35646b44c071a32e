"""The ``python -m jdoptim`` demonstration: its claims, its command line, its outputs."""

from __future__ import annotations

import io
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jdoptim import aggregation, catalog, scalarization
from jdoptim.demo import cli, methods, multitask, report, toy
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
    args = ["--steps", "12", "--toy-steps", "8", "--methods", "upgrad,MGDA,PCGrad", "--seeds", "0"]
    status = main(args, out)
    text = out.getvalue()
    assert status == 0
    assert "got worse" in text and "time/step" in text and "reached" in text
    assert "conflicts" in text and "/12" in text and "steps to reach" in text
    for method in ("Sum", "UPGrad", "MGDA", "PCGrad"):
        assert sum(line.startswith(method + " ") for line in text.splitlines()) == 2
    assert not any(line.startswith("CAGrad ") for line in text.splitlines())
    assert "Over seeds" not in text  # --seeds 0 skips the summary


def test_cli_summarises_sum_and_upgrad_over_seeds():
    out = io.StringIO()
    args = ["--steps", "6", "--methods", "MGDA", "--seeds", "2", "--only", "multitask"]
    assert main(args, out) == 0
    text = out.getvalue()
    assert "Over seeds 0-1" in text and "seeds with a task worse" in text
    summary = text[text.index("Over seeds") :].splitlines()
    assert sum(line.startswith(("Sum ", "UPGrad ")) for line in summary) == 2
    assert not any(line.startswith("MGDA ") for line in summary)


def test_seeds_table_counts_and_medians():
    def result(initial, final):
        curve = torch.zeros(1, 3)
        return multitask.MultiTaskResult("X", torch.tensor(initial), torch.tensor(final), curve, 0)

    runs = {
        "X": [
            result([1.0, 1.0, 1.0], [0.5, 2.0, 0.25]),  # B worse
            result([2.0, 1.0, 1.0], [3.0, 0.5, 0.5]),  # A worse
            result([1.0, 1.0, 4.0], [0.1, 0.5, 1.0]),  # none worse
        ]
    }
    lines = report.seeds_table(runs).splitlines()
    cells = lines[2].split()
    # final/start per task: A (0.5, 1.5, 0.1) -> 0.5; B (2, 0.5, 0.5) -> 0.5; C (0.25, 0.5, 0.25)
    assert cells == ["X", "2/3", "(A", "in", "1,", "B", "in", "1)", "0.5", "0.5", "0.25"]


def test_interleaved_runs_follow_the_trajectories_of_separate_runs():
    problem = multitask.MultiTaskProblem(seed=0)
    together = multitask.train_interleaved(problem, ["Sum", "UPGrad", "PCGrad"], steps=8)
    for result in together:
        alone = multitask.train(problem, result.method, steps=8)
        torch.testing.assert_close(result.curve, alone.curve, rtol=0, atol=0)
        torch.testing.assert_close(result.final, alone.final, rtol=0, atol=0)
        assert result.conflicted_steps == alone.conflicted_steps
        assert result.time_ratio is not None and result.time_ratio > 0
    assert together[0].time_ratio == 1.0  # the plain step against itself, round by round
    no_baseline = multitask.train_interleaved(problem, ["UPGrad"], steps=2)
    assert no_baseline[0].time_ratio is None


@pytest.mark.parametrize("name", methods.KNOWN_AGGREGATORS)
def test_every_catalogue_method_trains_in_the_demo(name):
    problem = multitask.MultiTaskProblem(seed=0)
    result = multitask.train(problem, name, steps=3)
    assert result.curve.shape == (3, 3) and bool(torch.isfinite(result.final).all())
    if methods.runs_on_toy(name):
        ran = toy.optimise(name, starts=((0.0, 0.0),), steps=3)
        assert ran.paths[0].shape == (4, 2)


def test_toy_skips_methods_that_need_three_losses():
    out = io.StringIO()
    args = ["--only", "toy", "--toy-steps", "2", "--methods", "Krum,TrimmedMean,UPGrad"]
    assert main(args, out) == 0
    text = out.getvalue()
    assert "Krum, TrimmedMean: need 3 or more losses" in text
    args = ["--only", "toy", "--toy-steps", "2", "--methods", "GradNorm,DBMTL,UPGrad"]
    out = io.StringIO()
    assert main(args, out) == 0
    assert "GradNorm, DBMTL: use the loss values, which must be positive" in out.getvalue()
    table = text[text.index("steps to reach") :].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["Sum", "UPGrad"]


def test_toy_steps_to_reach():
    far, near = [0.0, 0.0], [1.0, -8.3]
    result = toy.ToyResult("X", [torch.tensor([far, far, near, near]), torch.tensor([far] * 4)], 0)
    assert result.steps_to_reach() == [2, None]
    # Median over the starts, a start that never got there counting as later than any.
    two = toy.ToyResult("X", [torch.tensor([far, near])] * 2 + [torch.tensor([far, far])], 0)
    assert report.toy_table([two]).splitlines()[2].split()[-1] == "1"
    once = toy.ToyResult("X", [result.paths[0], result.paths[1], result.paths[1]], 0)
    assert report.toy_table([once]).splitlines()[2].split()[-2:] == [">", "3"]


def test_cli_caps_the_toy_budget_before_running(capsys):
    assert main(["--toy-steps", str(cli.MAX_TOY_STEPS + 1)], io.StringIO()) == 2
    assert "at most 2000" in capsys.readouterr().err


def test_cli_checks_the_plots_directory_before_running(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    for target in (blocker, blocker / "below"):
        out = io.StringIO()
        assert main(["--plots", str(target)], out) == 2
        assert out.getvalue() == ""  # nothing ran
        assert "is a file, not a directory" in capsys.readouterr().err


def test_cli_default_methods_are_known_aggregators():
    for name in methods.DEFAULT_METHODS:
        assert name == methods.BASELINE or name in methods.KNOWN_AGGREGATORS
    for name in methods.KNOWN_AGGREGATORS:
        assert methods.make_aggregator(name, 3) is not methods.make_aggregator(name, 3)


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


def test_module_entry_point_lists_every_method_one_line_each():
    completed = subprocess.run(
        [sys.executable, "-m", "jdoptim", "--list"], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0
    lines = completed.stdout.splitlines()
    listed = [line.split()[0] for line in lines[2:]]
    assert listed == [entry.label for entry in catalog.METHODS]
    assert f"{len(catalog.METHODS)} methods" in lines[0]
    for line, entry in zip(lines[2:], catalog.METHODS):
        assert entry.summary in line and entry.paper in line and entry.needs in line


_BASES = (
    aggregation.Aggregator,
    aggregation.GramianWeightedAggregator,
    aggregation.InputAggregator,
    aggregation.InputWeightedAggregator,
)


def _aggregator_classes() -> set[str]:
    names = set()
    for name in aggregation.__all__:
        cls = getattr(aggregation, name)
        abstract = cls in _BASES
        if isinstance(cls, type) and issubclass(cls, aggregation.Aggregator) and not abstract:
            names.add(name)
    # Weightings that wrap another weighting, listed by their own name (no aggregator class).
    return names | {"CRMOGMWeighting"}


def _needs(built: aggregation.Aggregator) -> str:
    """What a step must give ``built``, from its class and its declared inputs."""
    from jdoptim.aggregation._inputs import needs_of
    from jdoptim.updates.cross_batch import cross_weighting

    if cross_weighting(built) is not None:
        return "J1 J2^T"
    gramian_only = isinstance(built, aggregation.GramianWeightedAggregator)
    base = "Gramian" if gramian_only else "Jacobian"
    return f"{base} + losses" if "losses" in needs_of(built) else base


def _scalarizer_holds_state(built: scalarization.Scalarizer) -> bool:
    """State that a step changes: learned parameters, extra state (averages, generators,
    warm-up statistics) or buffers."""
    own_extra = type(built).get_extra_state is not torch.nn.Module.get_extra_state
    return own_extra or bool(built.learnable_parameters()) or bool(list(built.buffers()))


def test_the_catalogue_lists_every_aggregator_truthfully():
    ours = [entry for entry in catalog.METHODS if entry.module == "aggregation"]
    assert {entry.name for entry in ours} == _aggregator_classes()
    for entry in ours:
        built = entry.build(3)
        assert entry.needs == _needs(built), entry.name
        stateful = isinstance(built, aggregation.Stateful) or any(
            isinstance(module, aggregation.Stateful) for module in built.modules()
        )
        assert (entry.stateful != "no") == stateful, entry.name
        assert entry.in_demo == (entry.needs != "J1 J2^T"), entry.name
        assert entry.build(3) is not built


def test_the_catalogue_lists_every_scalarizer_truthfully():
    ours = [entry for entry in catalog.METHODS if entry.module == "scalarization"]
    assert {entry.name for entry in ours} == set(scalarization.__all__) - {"Scalarizer"}
    values = torch.tensor([0.5, 1.0, 2.0])
    for entry in ours:
        built = entry.build(3)
        assert isinstance(built, scalarization.Scalarizer) and entry.needs == "losses"
        assert (entry.stateful != "no") == _scalarizer_holds_state(built), entry.name
        assert built(values).shape == ()  # built for 3 losses
        assert catalog.by_name(entry.label) is entry and not entry.in_demo


def test_the_documentation_lists_the_catalogue():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Za-z.]+)` \|", readme, flags=re.MULTILINE)
    assert rows == [entry.label for entry in catalog.METHODS]
    # The site's methods page is the README's section; the API page has one section per method.
    assert "{{ readme: ## Methods }}" in (root / "docs/methods.md").read_text(encoding="utf-8")
    api = (root / "docs/api/aggregation.md").read_text(encoding="utf-8")
    sections = re.findall(r"^::: (jdoptim\.aggregation\.[a-z_]+)$", api, flags=re.MULTILINE)
    ours = [entry for entry in catalog.METHODS if entry.module == "aggregation"]
    modules = [getattr(aggregation, entry.name).__module__ for entry in ours]
    assert sections[: len(modules)] == modules
    api = (root / "docs/api/scalarization.md").read_text(encoding="utf-8")
    sections = re.findall(r"^::: (jdoptim\.scalarization\.[a-z_]+)$", api, flags=re.MULTILINE)
    ours = [entry for entry in catalog.METHODS if entry.module == "scalarization"]
    modules = [getattr(scalarization, entry.name).__module__ for entry in ours]
    assert sections[: len(modules)] == modules


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
