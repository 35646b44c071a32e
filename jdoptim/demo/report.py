"""Plain-text tables of the demo's results."""

from __future__ import annotations

from collections.abc import Sequence

from .multitask import TASKS, MultiTaskResult
from .toy import ToyResult, distance_to_pareto_set

__all__ = ["format_table", "multitask_table", "toy_table"]


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
    baseline = next((r.seconds_per_step for r in results if r.method == "Sum"), None)
    rows = [["(start)", *(f"{v:.4f}" for v in results[0].initial.tolist()), "", "", ""]]
    for result in results:
        steps = result.curve.shape[0]
        ratio = (
            f"{result.seconds_per_step / baseline:.1f}×"
            if baseline
            else f"{result.seconds_per_step * 1e3:.2f} ms"
        )
        worse = ", ".join(result.worsened) or "none"
        conflicts = "" if result.conflicted_steps is None else f"{result.conflicted_steps}/{steps}"
        final = [f"{v:.4f}" for v in result.final.tolist()]
        rows.append([result.method, *final, worse, conflicts, ratio])
    return format_table(header, rows)


def toy_table(results: Sequence[ToyResult], tolerance: float = 0.3) -> str:
    """Where each trajectory ended and how many reached the Pareto set."""
    starts = [path[0].tolist() for path in results[0].paths]
    header = ["method", *(f"from ({x:g}, {y:g})" for x, y in starts)]
    header.append("reached")
    rows = []
    for result in results:
        cells = []
        for final, distance in zip(result.finals, distance_to_pareto_set(result.finals)):
            mark = "✓" if distance < tolerance else "✗"
            cells.append(f"({final[0]:.1f}, {final[1]:.1f}) {mark}")
        reached = sum(result.reached(tolerance))
        rows.append([result.method, *cells, f"{reached}/{len(result.paths)}"])
    return format_table(header, rows)
