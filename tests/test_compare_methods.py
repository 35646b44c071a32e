"""The comparison benchmark (benchmarks/compare_methods.py): its aggregation over seeds against
hand-computed numbers, and a tiny real run that includes a scalarizer with learnable weights."""

from __future__ import annotations

import pytest
import torch

from benchmarks.compare_methods import SKIPPED, aggregate, all_methods, markdown_table, run_seed
from jdoptim import catalog
from jdoptim.demo.multitask import MultiTaskProblem, MultiTaskResult


def _result(method: str, initial: list[float], final: list[float], ratio: float) -> MultiTaskResult:
    return MultiTaskResult(
        method, torch.tensor(initial), torch.tensor(final), torch.zeros(1, 3), 1.0,
        time_ratio=ratio,
    )  # fmt: skip


def test_aggregate_matches_hand_computed_medians_and_counts() -> None:
    # Method X over three seeds: final/start per task is
    #   seed 0: 0.5, 2.0, 0.25   seed 1: 0.5, 0.5, 3.0   seed 2: 1.0, 0.75, 0.5
    # medians: A 0.5, B 0.75, C 0.5; worse (> 1): A 0, B 1, C 1; any task worse: 2 seeds;
    # worst task per seed 2.0, 3.0, 1.0 -> median 2.0; time ratios 3, 1, 2 -> median 2.
    x = [
        _result("X", [2.0, 1.0, 4.0], [1.0, 2.0, 1.0], 3.0),
        _result("X", [2.0, 2.0, 1.0], [1.0, 1.0, 3.0], 1.0),
        _result("X", [1.0, 4.0, 2.0], [1.0, 3.0, 1.0], 2.0),
    ]
    # Method Y: never worse, slower; it sorts before X (fewer seeds with a task worse).
    y = [_result("Y", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], 9.0) for _ in range(3)]
    rows = aggregate([[x[s], y[s]] for s in range(3)])
    assert [row.method for row in rows] == ["Y", "X"]
    row = rows[1]
    assert row.relative == [0.5, 0.75, 0.5]
    assert row.worse_seeds == [0, 1, 1]
    assert row.any_worse_seeds == 2
    assert row.worst_relative == 2.0
    assert row.time_ratio == 2.0
    table = markdown_table(rows, seeds=3)
    assert "| `X` | aggregator | 0.5 | 0.75 | 0.5 | 2 | 2 | 0/1/1 | 2.00 |" in table


def test_methods_are_the_catalogue_minus_the_cross_batch_ones() -> None:
    methods = all_methods()
    expected = {e.label for e in catalog.METHODS if e.name not in ("MoDo", "SDMGrad")}
    assert set(methods) == expected and methods[0] == "Sum"
    assert set(SKIPPED) == {"MoDo", "SDMGrad"}


def test_tiny_run_reproduces_an_independent_plain_adam_loop() -> None:
    steps = 8  # warm-up over the first 2 steps: lr 2.5e-3, then 5e-3
    results = run_seed(0, ("Sum", "scalarization.UW", "UPGrad"), steps)
    assert [r.method for r in results] == ["Sum", "scalarization.UW", "UPGrad"]
    assert results[0].time_ratio == 1.0  # the plain step against itself, every round
    assert all(r.time_ratio is not None and r.time_ratio > 0 for r in results)
    # Independent computation of the plain run: Adam on the summed loss, same warm-up schedule.
    problem = MultiTaskProblem(seed=0)
    model = problem.model()
    adam = torch.optim.Adam(model.parameters(), lr=5e-3)
    for k in range(steps):
        for group in adam.param_groups:
            group["lr"] = 5e-3 * min(1.0, (k + 1) / max(steps // 4, 1))
        adam.zero_grad()
        sum(problem.losses(model).values()).backward()
        adam.step()
    with torch.no_grad():
        expected = torch.stack(list(problem.losses(model).values()))
    torch.testing.assert_close(results[0].final, expected)


def test_aggregate_refuses_an_untimed_or_misaligned_seed() -> None:
    timed = _result("X", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], 2.0)
    untimed = _result("X", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], 2.0)
    untimed.time_ratio = None
    other = _result("Y", [1.0, 1.0, 1.0], [0.5, 0.5, 0.5], 2.0)
    for bad in (untimed, other):
        with pytest.raises(ValueError, match="every seed needs the same methods"):
            aggregate([[timed], [bad]])
