"""PNG figures of the demo's results (needs matplotlib: ``pip install "jdoptim[plot]"``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .multitask import TASKS, MultiTaskResult
from .toy import PARETO_X2, ToyResult, objectives

__all__ = ["matplotlib_available", "plot_multitask", "plot_toy"]


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            'Plotting needs matplotlib: pip install "jdoptim[plot]" (or pip install matplotlib).'
        ) from error
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def plot_multitask(
    results: Sequence[MultiTaskResult], path: str | Path, seed: int | None = None
) -> Path:
    """One panel per task: its training loss under each method (log scale), its starting loss
    dotted; one legend for the figure, below the panels."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.9), squeeze=False)
    for index, (ax, task) in enumerate(zip(axes[0], TASKS)):
        for result in results:
            style = "--" if result.method == "Sum" else "-"
            label = "Sum (plain summed loss)" if result.method == "Sum" else result.method
            ax.plot(result.curve[:, index].numpy(), style, label=label, linewidth=1.4)
        start = results[0].initial[index].item()
        ax.axhline(start, color="grey", linewidth=1.0, linestyle=":", label="starting loss")
        ax.set_yscale("log")
        ax.set_title(f"task {task}")
        ax.set_xlabel("training step")
    axes[0][0].set_ylabel("training loss (log scale)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 7), frameon=False)
    where = "" if seed is None else f", seed {seed}"
    fig.suptitle(
        f"Multi-task regression, per-task training loss (Adam{where}): a curve that ends above "
        "the dotted line made its task worse"
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, path, plt)


def _toy_background(ax: Any, x1: Any, x2: Any, total: Any) -> None:
    """The contours of ``f₁ + f₂`` (darker: higher) and the Pareto set (black segment)."""
    ax.contourf(x1, x2, total, levels=30, cmap="Greys", alpha=0.5)
    ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="black", linewidth=3)
    ax.set_xlim(-10, 10)
    ax.set_ylim(-10, 10)
    ax.set_xticks([-5, 0, 5])  # not ±10: those of neighbouring panels would run together
    ax.set_yticks([-5, 0, 5])


def _toy_legend(fig: Any, columns: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [
        Line2D([], [], marker="o", color="black", linestyle="", markersize=5, label="start"),
        Line2D([], [], marker="*", color="tab:green", linestyle="", markersize=11,
               label="end: reached the Pareto set"),
        Line2D([], [], marker="*", color="tab:red", linestyle="", markersize=11,
               label="end: did not reach it"),
        Line2D([], [], color="black", linewidth=3, label="Pareto set (x2 = -8.4, |x1| ≤ 7)"),
        Patch(facecolor="0.55", alpha=0.5, label="shading: f1 + f2 (darker = higher)"),
    ]  # fmt: skip
    fig.legend(handles=handles, loc="lower center", ncol=min(columns, 3), frameon=False)


def plot_toy(results: Sequence[ToyResult], path: str | Path) -> Path:
    """One panel per method: trajectories over the contours of ``f₁ + f₂``, Pareto set in black,
    starts as black dots, ends as stars (green: reached the set, red: not)."""
    plt = _pyplot()
    columns = min(3, len(results))
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.2 * max(columns, 2), 3.9 * rows + 0.9), squeeze=False,
        sharex=True, sharey=True,
    )  # fmt: skip
    x1, x2 = torch.meshgrid(
        torch.linspace(-10, 10, 200, dtype=torch.float64),
        torch.linspace(-10, 10, 200, dtype=torch.float64),
        indexing="xy",
    )
    f1, f2 = objectives(torch.stack([x1, x2], dim=-1))
    total = (f1 + f2).numpy()
    for ax, result in zip(axes.flat, results):
        _toy_background(ax, x1.numpy(), x2.numpy(), total)
        for trajectory, reached in zip(result.paths, result.reached()):
            points = trajectory.numpy()
            color = "tab:green" if reached else "tab:red"
            ax.plot(points[:, 0], points[:, 1], color=color, linewidth=1.5)
            ax.plot(points[0, 0], points[0, 1], "o", color="black", markersize=5)
            ax.plot(points[-1, 0], points[-1, 1], "*", color=color, markersize=11)
        ax.set_title(f"{result.method}: {sum(result.reached())}/{len(result.paths)} reached")
    for index, ax in enumerate(axes.flat):
        if index >= len(results):
            ax.axis("off")
        elif index + columns >= len(results):  # the lowest panel of its column
            ax.set_xlabel("x1")
            ax.xaxis.set_tick_params(labelbottom=True)
    for ax in axes[:, 0]:
        ax.set_ylabel("x2")
    steps = results[0].paths[0].shape[0] - 1
    _toy_legend(fig, columns)
    fig.suptitle(
        f"Toy problem: Adam from five starts, {steps} steps\n"
        "(Sum: the summed loss; the others: JDOptimizer(Adam, method))"
    )
    legend_height = 0.8 if columns >= 3 else 1.1  # two or three rows of entries
    fig.tight_layout(rect=(0, legend_height / (3.9 * rows + 0.9), 1, 1))
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
