r"""Explicit rows held from the Gramian to the update: one product for each.

Where a rule computes a parameter's Gramian from its explicit rows ``R_p = ∂ℓ/∂p``
(``[bT, n_p]``: a layer whose rows are cheaper than its kernel contraction, a norm's affine, a
parameter tied into several calls, one used outside any call), the engine used to take
``R_p R_pᵀ`` and drop ``R_p``, and later rebuild the update ``wᵀ R_p`` from the call's output
gradients (one weight-gradient product per layer, over every position). Holding the rows
instead, side by side in one matrix ``R = [R_{p₁} … R_{p_n}]`` (``[bT, Σ n_p]``), gives

.. math::  Σ_p R_p R_pᵀ = R Rᵀ, \qquad (wᵀ R_p)_p = \mathrm{split}(wᵀ R),

one product for the Gramian of all of them and one ``[1, bT] × [bT, Σ n_p]`` product for all
their updates, where each layer paid a few small operations for each. On the small
transformers of ``benchmarks/`` (a dozen layers, a few tensor operations of 10–20 µs each per
layer and step) this is about a tenth of a per-sample step.

The rows cost memory until the weights are known (``bT`` times the parameters they cover), so
the step holds them up to a budget (:func:`held_rows_budget`) and takes the others as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

#: The budget's floor: rows up to this size are held whatever the step holds otherwise.
HELD_ROWS_FLOOR_BYTES = 8 * 2**20


def held_rows_budget(held_gradients_bytes: int) -> int:
    """Bytes of rows a step may hold: as much as the output gradients it holds anyway for the
    update (so that holding rows at most doubles that part of its memory), and at least
    :data:`HELD_ROWS_FLOOR_BYTES`."""
    return max(held_gradients_bytes, HELD_ROWS_FLOOR_BYTES)


@dataclass(eq=False)
class HeldRows:
    """Rows ``[b, T, *p.shape]`` of some parameters, collected up to a budget of bytes, then
    held as one matrix ``R`` (``[bT, Σ n_p]``, :meth:`seal`).

    Rows are taken (:meth:`take`) while they fit the budget and have the first rows' dtype
    and device.
    """

    budget: int
    params: list[Tensor] = field(default_factory=list)
    rows: list[Tensor] = field(default_factory=list)
    used: int = 0
    matrix: Tensor | None = None

    def room(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit the budget."""
        return self.used + nbytes <= self.budget

    def take(self, param: Tensor, rows: Tensor) -> bool:
        """Hold ``rows`` (``[b, T, *param.shape]``) for ``param`` if they fit the budget and
        have the held rows' dtype and device; whether they are held."""
        nbytes = rows.numel() * rows.element_size()
        if not self.room(nbytes):
            return False
        if self.rows and (rows.dtype, rows.device) != (self.rows[0].dtype, self.rows[0].device):
            return False
        self.used += nbytes
        self.params.append(param)
        self.rows.append(rows)
        return True

    @property
    def ids(self) -> set[int]:
        """The ids of the parameters held."""
        return {id(p) for p in self.params}

    def seal(self) -> None:
        """Put the rows side by side in ``R`` (the separate rows are dropped)."""
        if self.rows:
            count = self.rows[0].shape[0] * self.rows[0].shape[1]
            self.matrix = torch.cat([rows.reshape(count, -1) for rows in self.rows], dim=1)
        self.rows = []

    def gramian(self) -> Tensor | None:
        """``R Rᵀ`` (``[bT, bT]``), or ``None`` when nothing is held."""
        return None if self.matrix is None else self.matrix @ self.matrix.T

    def updates(self, weights: Tensor) -> dict[int, Tensor]:
        """``wᵀ R_p`` for each held parameter (by id), shaped as the parameter (views of one
        product); ``weights`` is ``[b, T]``."""
        if self.matrix is None:
            return {}
        flat = weights.reshape(1, -1).to(self.matrix.dtype) @ self.matrix
        sizes = [p.numel() for p in self.params]
        parts = torch.split(flat[0], sizes)
        return {id(p): part.view(p.shape) for p, part in zip(self.params, parts)}
