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


def plot_multitask(results: Sequence[MultiTaskResult], path: str | Path) -> Path:
    """One panel per task: its training loss under each method (log scale)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(TASKS), figsize=(4.2 * len(TASKS), 3.4), squeeze=False)
    for index, (ax, task) in enumerate(zip(axes[0], TASKS)):
        for result in results:
            style = "--" if result.method == "Sum" else "-"
            ax.plot(result.curve[:, index].numpy(), style, label=result.method, linewidth=1.4)
        ax.axhline(results[0].initial[index].item(), color="grey", linewidth=0.8, linestyle=":")
        ax.set_yscale("log")
        ax.set_title(f"task {task}")
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss (dotted: start)")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path, plt)


def plot_toy(results: Sequence[ToyResult], path: str | Path) -> Path:
    """One panel per method: trajectories over the contours of ``f₁ + f₂``, Pareto set in black."""
    plt = _pyplot()
    columns = min(3, len(results))
    rows = math.ceil(len(results) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.0 * columns, 3.6 * rows), squeeze=False, sharex=True, sharey=True
    )
    x1, x2 = torch.meshgrid(
        torch.linspace(-10, 10, 200, dtype=torch.float64),
        torch.linspace(-10, 10, 200, dtype=torch.float64),
        indexing="xy",
    )
    f1, f2 = objectives(torch.stack([x1, x2], dim=-1))
    total = (f1 + f2).numpy()
    for ax, result in zip(axes.flat, results):
        ax.contourf(x1.numpy(), x2.numpy(), total, levels=30, cmap="Greys", alpha=0.5)
        ax.plot([-7, 7], [PARETO_X2, PARETO_X2], color="black", linewidth=3, label="Pareto set")
        for trajectory, reached in zip(result.paths, result.reached()):
            points = trajectory.numpy()
            color = "tab:green" if reached else "tab:red"
            ax.plot(points[:, 0], points[:, 1], color=color, linewidth=1.5)
            ax.plot(points[0, 0], points[0, 1], "o", color="black", markersize=4)
            ax.plot(points[-1, 0], points[-1, 1], "*", color=color, markersize=10)
        ax.set_title(f"{result.method}: {sum(result.reached())}/{len(result.paths)} reached")
        ax.set_xlim(-10, 10)
        ax.set_ylim(-10, 10)
    for ax in list(axes.flat)[len(results) :]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, path, plt)


def _save(fig: Any, path: str | Path, plt: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
