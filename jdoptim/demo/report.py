"""Plain-text tables of the demo's results."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import torch

from .multitask import TASKS, MultiTaskResult
from .toy import ToyResult, distance_to_pareto_set

__all__ = ["format_table", "multitask_table", "seeds_table", "toy_table"]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def multitask_table(results: Sequence[MultiTaskResult]) -> str:
    """Final loss per task (initial loss in the first row), worsened tasks, steps with conflicting
    task gradients (JD runs), relative step time."""
    header = ["method", *(f"task {t}" for t in TASKS), "got worse", "conflicts", "time/step"]
    rows = [["(start)", *(f"{v:.4f}" for v in results[0].initial.tolist()), "", "", ""]]
    for result in results:
        steps = result.curve.shape[0]
        ratio = (
            f"{result.time_ratio:.1f}×"
            if result.time_ratio is not None
            else f"{result.seconds_per_step * 1e3:.2f} ms"
        )
        worse = ", ".join(result.worsened) or "none"
        conflicts = "" if result.conflicted_steps is None else f"{result.conflicted_steps}/{steps}"
        final = [f"{v:.4f}" for v in result.final.tolist()]
        rows.append([result.method, *final, worse, conflicts, ratio])
    return format_table(header, rows)


def seeds_table(runs: dict[str, list[MultiTaskResult]]) -> str:
    """For each method, over several seeds: in how many seeds some task ended worse than it
    started (and which), and the median over seeds of each task's final / starting loss."""
    header = ["method", "seeds with a task worse", *(f"task {t}: final/start" for t in TASKS)]
    rows = []
    for method, results in runs.items():
        worse = [r for r in results if r.worsened]
        counts = {t: sum(t in r.worsened for r in results) for t in TASKS}
        which = ", ".join(f"{t} in {n}" for t, n in counts.items() if n)
        cell = f"{len(worse)}/{len(results)}" + (f" ({which})" if which else "")
        ratios = torch.stack([r.final / r.initial for r in results])  # [seeds, tasks]
        medians = ratios.median(dim=0).values.tolist()
        rows.append([method, cell, *(f"{v:.3g}" for v in medians)])
    return format_table(header, rows)


def toy_table(results: Sequence[ToyResult], tolerance: float = 0.3) -> str:
    """Where each trajectory ended (✓: within ``tolerance`` of the Pareto set), how many reached
    it, and the median over the starts of the steps to get there (see :func:`_median_steps`)."""
    starts = [path[0].tolist() for path in results[0].paths]
    header = ["method", *(f"from ({x:g}, {y:g})" for x, y in starts)]
    header += ["reached", "steps to reach"]
    rows = []
    for result in results:
        cells = []
        for final, distance in zip(result.finals, distance_to_pareto_set(result.finals)):
            mark = "✓" if distance < tolerance else "✗"
            cells.append(f"({final[0]:.1f}, {final[1]:.1f}) {mark}")
        reached = sum(result.reached(tolerance))
        rows.append(
            [result.method, *cells, f"{reached}/{len(result.paths)}", _median_steps(result)]
        )
    return format_table(header, rows)


def _median_steps(result: ToyResult, tolerance: float = 0.3) -> str:
    """The median over all starts of the first step within ``tolerance`` of the Pareto set, a
    start that never got there counting as later than any (``"> N"`` when that is the median)."""
    steps = result.paths[0].shape[0] - 1
    firsts = [steps + 1 if s is None else s for s in result.steps_to_reach(tolerance)]
    median = statistics.median_low(firsts)
    return f"> {steps}" if median > steps else str(median)
