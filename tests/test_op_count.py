"""The engine step's fixed overhead as a regression test.

Timings are noise on shared CPUs, but the number of tensor operations a step dispatches is
deterministic (``benchmarks/op_count.py``). This asserts that a JD step on the engine benchmark's
MLP dispatches at most ``budget`` operations more than the plain summed-loss step of the same
case; the budgets are the counts of 2026-12-06 (torch 2.13). A change that adds operations to
every step fails here: lower the budget when a change removes some, raise it only with a reason
in the commit (``python benchmarks/op_count.py --where CASE`` lists them by line).
"""

from __future__ import annotations

import pytest

from benchmarks.op_count import count_operations

# (case, method): most operations a JD step may add to the plain step of the same case.
BUDGETS = {
    ("per-sample losses, batch 16", "jdoptim UPGrad"): 34,
    ("per-sample losses, batch 16", "jdoptim Mean"): 25,
    ("2 task losses, batch 128", "jdoptim UPGrad"): 103,
    ("8 task losses, batch 128", "jdoptim UPGrad"): 143,
}


@pytest.mark.parametrize(("case", "method"), sorted(BUDGETS))
def test_engine_step_overhead_in_operations(case: str, method: str) -> None:
    plain = count_operations(case, "plain").total
    jd = count_operations(case, method).total
    assert plain > 50, "the counter saw no operations: the test would prove nothing"
    overhead = jd - plain
    assert overhead <= BUDGETS[(case, method)], (
        f"{method} on {case!r}: {overhead} operations over the plain step's {plain}, budget "
        f"{BUDGETS[(case, method)]}; see `python benchmarks/op_count.py --where {case!r}`"
    )
