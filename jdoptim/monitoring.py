r"""What a JD step tells about the losses, computed from its Gramian: no extra backward pass.

For the losses' Jacobian ``J`` over the shared parameters (one row ``gᵢ`` per loss), the step
already holds ``G = J Jᵀ`` and, for a Gramian-weighted aggregator, the weights ``w`` of the update
``d = Jᵀ w``. From these ``m × m`` numbers alone:

* the cosine similarities ``cos(gᵢ, gⱼ) = Gᵢⱼ / √(Gᵢᵢ Gⱼⱼ)``;
* the number of conflicting pairs ``i < j`` with ``gᵢ · gⱼ < 0``;
* the norm of the update ``‖d‖ = √(wᵀ G w)``;
* the directional derivative of each loss along the update, ``J d = G w`` (``(G w)ᵢ ≥ 0``: the
  update does not conflict with loss ``i``; the optimizer then steps along ``-lr · d``, after its
  own preconditioning).

All of them are over the *shared* parameters (those reached by several losses); the specific
parameters of a task head get their own loss's gradient, which never conflicts. They are exposed
lazily as properties of :class:`~jdoptim.StepRecord` (``record.cosine_similarities``, ...), so
nothing is computed unless asked for. For aggregators that are not Gramian-weighted
(``record.weights is None``: GradDrop, TrimmedMean, ...) the update-dependent ones are ``None``.

:class:`History` keeps these numbers for a whole run (as plain floats, not the records, which hold
the parameters) and :func:`plot_history` draws them::

    history = History()
    for batch in loader:
        history.append(opt.step(losses))
    plot_history(history, "jd_run.png")     # needs matplotlib
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .record import StepRecord

__all__ = [
    "History",
    "conflicting_pairs",
    "cosine_similarities",
    "directional_derivatives",
    "plot_history",
    "summarize",
    "update_norm",
]


def cosine_similarities(gramian: Tensor) -> Tensor:
    """``cos(gᵢ, gⱼ)`` from ``G``; rows and columns of zero gradients are 0 (diagonal included)."""
    norms = gramian.diagonal().clamp(min=0).sqrt()
    nonzero = norms > 0
    safe = torch.where(nonzero, norms, torch.ones_like(norms))
    cosines = (gramian / safe.unsqueeze(0) / safe.unsqueeze(1)).clamp(-1.0, 1.0)
    mask = nonzero.unsqueeze(0) & nonzero.unsqueeze(1)
    return torch.where(mask, cosines, torch.zeros_like(cosines))


def conflicting_pairs(gramian: Tensor) -> int:
    """The number of pairs ``i < j`` whose gradients conflict (``gᵢ · gⱼ < 0``)."""
    return int((gramian.triu(diagonal=1) < 0).sum())


def directional_derivatives(gramian: Tensor, weights: Tensor) -> Tensor:
    """``J d = G w``: each loss's directional derivative along the update ``d = Jᵀ w``."""
    return gramian @ weights.to(gramian.dtype)


def update_norm(gramian: Tensor, weights: Tensor) -> Tensor:
    """``‖d‖ = √(wᵀ G w)`` for the update ``d = Jᵀ w`` (over the shared parameters)."""
    weights = weights.to(gramian.dtype)
    return (weights @ gramian @ weights).clamp(min=0).sqrt()


def summarize(record: StepRecord) -> dict[str, Any]:
    """The record's monitoring numbers as plain Python values, for logging (one sync)."""
    summary: dict[str, Any] = {
        "losses": dict(zip(record.names, record.losses.tolist())),
        "skipped": record.skipped,
    }
    if record.weights is not None:
        summary["weights"] = dict(zip(record.names, record.weights.tolist()))
    if record.gramian is not None:
        summary["cosine_similarities"] = cosine_similarities(record.gramian).tolist()
        summary["conflicting_pairs"] = record.conflicting_pairs
    if record.update_norm is not None:
        summary["update_norm"] = float(record.update_norm)
        derivatives = record.directional_derivatives
        assert derivatives is not None
        summary["directional_derivatives"] = dict(zip(record.names, derivatives.tolist()))
    return summary


@dataclass
class History:
    """The monitoring numbers of a run, one entry per :meth:`append`\\ ed step record.

    Each field is a list over steps: ``losses``, ``weights`` and ``directional_derivatives`` hold
    one list of ``m`` floats per step (``None`` when not available), ``conflicting_pairs`` ints,
    ``update_norm`` floats, ``min_cosine`` the smallest off-diagonal cosine similarity.
    """

    names: tuple[str, ...] = ()
    losses: list[list[float]] = field(default_factory=list)
    weights: list[list[float] | None] = field(default_factory=list)
    conflicting_pairs: list[int | None] = field(default_factory=list)
    min_cosine: list[float | None] = field(default_factory=list)
    update_norm: list[float | None] = field(default_factory=list)
    directional_derivatives: list[list[float] | None] = field(default_factory=list)

    def append(self, record: StepRecord) -> None:
        if not self.names:
            self.names = record.names
        self.losses.append(record.losses.tolist())
        self.weights.append(None if record.weights is None else record.weights.tolist())
        if record.gramian is None:
            self.conflicting_pairs.append(None)
            self.min_cosine.append(None)
        else:
            self.conflicting_pairs.append(record.conflicting_pairs)
            cosines = cosine_similarities(record.gramian)
            m = cosines.shape[0]
            off = cosines[~torch.eye(m, dtype=torch.bool, device=cosines.device)]
            self.min_cosine.append(float(off.min()) if off.numel() else None)
        norm, derivatives = record.update_norm, record.directional_derivatives
        self.update_norm.append(None if norm is None else float(norm))
        self.directional_derivatives.append(None if derivatives is None else derivatives.tolist())

    def __len__(self) -> int:
        return len(self.losses)


def plot_history(history: History | Iterable[StepRecord], path: str | Path | None = None) -> Any:
    """Four panels over steps: losses, weights, conflicting pairs (and the smallest cosine),
    directional derivatives ``G w`` with the update norm. ``history`` is a :class:`History` or
    the run's step records. Returns the matplotlib figure, saved as PNG to ``path`` when given.
    Needs matplotlib (``pip install "jdoptim[plot]"``).
    """
    if not isinstance(history, History):
        records, history = history, History()
        for record in records:
            history.append(record)
    try:
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError('plot_history needs matplotlib: pip install "jdoptim[plot]".') from error

    steps = list(range(len(history)))
    fig, axes = plt.subplots(2, 2, figsize=(10, 6.5), sharex=True)
    _lines(axes[0][0], steps, history.losses, history.names, "losses")
    axes[0][0].set_yscale("log")
    _lines(axes[0][1], steps, history.weights, history.names, "weights")
    ax = axes[1][0]
    ax.plot(steps, [float("nan") if v is None else v for v in history.conflicting_pairs], "k")
    ax.set_ylabel("conflicting pairs")
    twin = ax.twinx()
    twin.plot(steps, [float("nan") if v is None else v for v in history.min_cosine], "tab:red")
    twin.set_ylabel("smallest cosine", color="tab:red")
    ax.set_title("conflicts between the losses' gradients")
    _lines(axes[1][1], steps, history.directional_derivatives, history.names, "Gw = J d")
    axes[1][1].axhline(0.0, color="grey", linewidth=0.8)
    twin = axes[1][1].twinx()
    twin.plot(steps, [float("nan") if v is None else v for v in history.update_norm], "k:")
    twin.set_ylabel("‖d‖ (dotted)")
    for ax in axes[1]:
        ax.set_xlabel("step")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def _lines(ax: Any, steps: list[int], rows: list, names: tuple[str, ...], title: str) -> None:
    width = max((len(row) for row in rows if row is not None), default=0)
    for i in range(width):
        values = [float("nan") if row is None else row[i] for row in rows]
        ax.plot(steps, values, label=names[i] if i < len(names) else str(i))
    ax.set_title(title)
    if 0 < width <= 10:
        ax.legend(fontsize=8)
