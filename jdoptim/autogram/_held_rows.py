r"""Explicit rows held from the Gramian to the update: one product for each.

Where a rule computes a parameter's Gramian from its explicit rows ``R_p = ∂ℓ/∂p``
(``[bT, n_p]``: a layer whose rows are cheaper than its kernel contraction, a norm's affine, a
parameter tied into several calls, one used outside any call), the engine used to take
``R_p R_pᵀ`` and drop ``R_p``, and later rebuild the update ``wᵀ R_p`` from the call's output
gradients (one weight-gradient product per layer, over every position). Holding the rows
instead, side by side in one matrix ``R = [R_{p₁} … R_{p_n}]`` (``[bT, Σ n_p]``), gives

.. math::  Σ_p R_p R_pᵀ = R Rᵀ, \qquad (wᵀ R_p)_p = \mathrm{split}(wᵀ R),

one product for the Gramian of all of them and one ``[1, bT] × [bT, Σ n_p]`` product for all
their updates, where each layer paid a few small operations for each.

**Memory.** The rows live until the weights are known (``bT`` times the parameters they cover),
so a step holds them up to a budget (:func:`held_rows_budget`) and takes the others as before.
Each layer's rows are copied into ``R`` as they are formed (one layer's rows at a time beside
``R``), and ``R`` is one matrix that the engine reuses from step to step
(:class:`RowsBuffer`): on CPU, a fresh matrix of a few MB per step would be fresh pages from the
system each time (the C allocator returns large freed blocks), whose first writes cost more
than the products themselves on the small models this is for.
"""

from __future__ import annotations

import itertools
import math
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..linalg.gramian import gram_matrix
from .rules import LayerRule, rows_gramian

if TYPE_CHECKING:
    from ._step import RuleParameters

#: Lent matrix shapes :class:`RowsBuffer` keeps at most (it forgets them and their blocks beyond).
_MAX_MATRICES = 64

#: Column blocks :class:`RowsBuffer` keeps at most (it forgets them all beyond: a model whose
#: layouts keep changing makes new ones).
_MAX_BLOCKS = 4096

#: The budget's floor: rows up to this size are held whatever the step holds otherwise.
HELD_ROWS_FLOOR_BYTES = 8 * 2**20


def held_rows_budget(held_gradients_bytes: int) -> int:
    """Bytes of rows a step may hold: as much as the output gradients it holds anyway for the
    update (so that holding rows at most doubles that part of its memory), and at least
    :data:`HELD_ROWS_FLOOR_BYTES`."""
    return max(held_gradients_bytes, HELD_ROWS_FLOOR_BYTES)


def rows_bytes(count: int, param: Tensor) -> int:
    """The bytes of ``count`` rows of ``param``, as the rules form them: in at least float32
    (:func:`~.rules._call.full_precision`)."""
    return count * param.numel() * max(param.element_size(), 4)


def split_as(flat: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    """``flat`` (a vector of ``Σ n_p`` entries) as consecutive views shaped as ``params``: by
    torch's own unflattening (all the views made in one call, where one Python-level ``view``
    per parameter costs 2–3 µs inside a step), or a split where torch has none."""
    if _UNFLATTEN is not None:
        return list(_UNFLATTEN(flat, params))
    parts = torch.split(flat, [p.numel() for p in params])
    return [part.view(p.shape) for p, part in zip(params, parts)]


#: ``torch._utils._unflatten_dense_tensors`` (DDP's), where this torch has it
_UNFLATTEN = getattr(torch._utils, "_unflatten_dense_tensors", None)


class RowsBuffer:
    """The engine's matrix for the held rows, lent to one step at a time.

    :meth:`lend` gives a ``[count, width]`` view of the kept buffer when no living step holds
    it and it is large enough in the right dtype and device; otherwise a fresh matrix (which
    becomes the kept buffer when the buffer is free). A step gives it back with :meth:`give_back`
    once its update is computed; a step dropped before that (a refused step) frees it too, since
    the buffer only holds a weak reference to its borrower. The kept buffer is as large as the
    largest ``R`` a step held (at most the held-rows budget).
    """

    def __init__(self) -> None:
        self._flat: Tensor | None = None
        self._borrower: weakref.ref | None = None
        #: views of the kept buffer, made once and reused while it is kept: the ``[count,
        #: width]`` matrices lent (by shape) and their column blocks (:meth:`block`). A step of
        #: a model holds the same layout every time, and each view made afresh is a tensor
        #: operation (a few µs inside a step: 58 of them on GPT-2 tiny).
        self._matrices: dict[tuple[int, int], Tensor] = {}
        self._blocks: dict[tuple, Tensor] = {}

    @property
    def nbytes(self) -> int:
        """The size of the kept buffer."""
        return 0 if self._flat is None else self._flat.numel() * self._flat.element_size()

    def _free(self) -> bool:
        return self._borrower is None or self._borrower() is None

    def lend(self, borrower: object, count: int, width: int, like: Tensor) -> Tensor:
        """A ``[count, width]`` matrix in ``like``'s dtype and device, for ``borrower``."""
        numel = count * width
        flat = self._flat
        free = self._free()
        fits = (
            flat is not None
            and (flat.dtype, flat.device) == (like.dtype, like.device)
            and flat.numel() >= numel
        )
        if free and fits:
            assert flat is not None
            self._borrower = weakref.ref(borrower)
            matrix = self._matrices.get((count, width))
            if matrix is None:
                if len(self._matrices) >= _MAX_MATRICES:  # (batch sizes that keep changing)
                    self._matrices.clear()
                    self._blocks.clear()
                matrix = self._matrices[(count, width)] = flat[:numel].view(count, width)
            return matrix
        fresh = torch.empty(numel, dtype=like.dtype, device=like.device)
        if free:
            self._flat, self._borrower = fresh, weakref.ref(borrower)
            self._blocks.clear()
            matrix = fresh.view(count, width)
            self._matrices = {(count, width): matrix}
            return matrix
        return fresh.view(count, width)

    def block(self, matrix: Tensor, start: int, shape: torch.Size) -> Tensor:
        """Columns ``start …`` of ``matrix`` (``[count, width]``) seen as ``shape`` (whose
        leading two dimensions hold the ``count`` rows: ``[b, T, *p.shape]``); the same view
        every time for a matrix this buffer lent from the kept buffer."""
        count, width = matrix.shape
        kept = self._matrices.get((count, width)) is matrix
        key = (count, width, start, shape)
        if kept and key in self._blocks:
            return self._blocks[key]
        view = matrix[:, start : start + math.prod(shape[2:])].view(shape)
        if kept:
            if len(self._blocks) >= _MAX_BLOCKS:
                self._blocks.clear()
            self._blocks[key] = view
        return view

    def give_back(self, borrower: object) -> None:
        """``borrower`` no longer reads what it was lent."""
        if self._borrower is not None and self._borrower() is borrower:
            self._borrower = None


@dataclass(eq=False)
class HeldRows:
    """The held rows ``R`` (``[bT, Σ n_p]``) of :attr:`params`, in that order."""

    params: list[Tensor] = field(default_factory=list)
    matrix: Tensor | None = None

    @property
    def ids(self) -> set[int]:
        """The ids of the parameters held."""
        return {id(p) for p in self.params}

    def gramian(self) -> Tensor | None:
        """``R Rᵀ`` (``[bT, bT]``), or ``None`` when nothing is held."""
        return None if self.matrix is None else gram_matrix(self.matrix)

    def updates(self, weights: Tensor) -> tuple[dict[int, Tensor], list[Tensor]]:
        """``wᵀ R_p`` for each held parameter (by id), shaped as the parameter: disjoint views
        of one fresh product, which is returned too (none when nothing is held); ``weights``
        is ``[b, T]``."""
        if self.matrix is None:
            return {}, []
        flat = weights.reshape(1, -1).to(self.matrix.dtype) @ self.matrix
        parts = split_as(flat[0], self.params)
        return dict(zip(map(id, self.params), parts)), [flat]


class HeldRowsWriter:
    """Fills ``R`` (``[count, width]``, from ``buffer`` for ``borrower``) with rows as they are
    formed; :meth:`held` gives the result.

    ``width`` is the columns of every parameter the step means to hold; rows that cannot join
    ``R`` (another dtype or device than the first rows') are refused by :meth:`put`, and ``R``
    is then narrowed to the columns filled.
    """

    def __init__(self, buffer: RowsBuffer | None, borrower: object, count: int, width: int):
        self.buffer = buffer
        self.borrower = borrower
        self.count = count
        self.width = width
        self.filled = 0
        self.params: list[Tensor] = []
        self.matrix: Tensor | None = None

    def put(self, param: Tensor, rows: Tensor) -> Tensor | None:
        """Copy ``rows`` (``[b, T, *param.shape]``) into ``R``; their place there (the
        ``[bT, param.numel()]`` columns, seen in the rows' shape), or ``None`` when they cannot
        join it."""
        if self.matrix is None:
            if self.buffer is None:
                self.matrix = rows.new_empty(self.count, self.width)
            else:
                self.matrix = self.buffer.lend(self.borrower, self.count, self.width, rows)
        elif (rows.dtype, rows.device) != (self.matrix.dtype, self.matrix.device):
            return None
        n = param.numel()
        shape = rows.shape
        if len(shape) >= 2 and shape[0] * shape[1] == self.count and self.buffer is not None:
            target = self.buffer.block(self.matrix, self.filled, shape)  # (rows' own shape)
            target.copy_(rows)
        else:
            target = self.matrix[:, self.filled : self.filled + n]
            target.copy_(rows.reshape(self.count, n))
        self.filled += n
        self.params.append(param)
        return target

    def held(self) -> HeldRows:
        """The rows put, as :class:`HeldRows`."""
        if not self.params:
            if self.buffer is not None:
                self.buffer.give_back(self.borrower)
            return HeldRows()
        assert self.matrix is not None
        matrix = self.matrix if self.filled == self.width else self.matrix[:, : self.filled]
        return HeldRows(self.params, matrix)


def _adds_in_place(rule: LayerRule) -> bool:
    """Whether ``rule`` adds its rows into given ones without forming them
    (:meth:`~.rules.LayerRule.add_jacobians` overridden: an embedding's lookup)."""
    return type(rule).add_jacobians is not LayerRule.add_jacobians


def _tied_into(
    writer: HeldRowsWriter, param: Tensor, rules: list[LayerRule], shape: tuple[int, int]
) -> Tensor | None:
    """A tied parameter's rows summed over its calls' ``rules`` in ``R``: the rows of a rule
    that forms them copied in, then every other rule's added in place (an embedding's scattered
    straight into ``R``, with no rows of zeros of its own and no sum out of place); or, when
    they cannot join ``R``, that sum (``[b, T, *param.shape]``), for the caller to keep apart."""
    first, *others = sorted(rules, key=_adds_in_place)  # (stable: the calls' order otherwise)
    rows = first.jacobians([param])[0]
    target = writer.put(param, rows)
    if target is None:
        for rule in others:
            rows = rows + rule.jacobians([param])[0]
        return rows
    if target.shape != (*shape, *param.shape):
        target = target.view(*shape, *param.shape)
    for rule in others:
        rule.add_jacobians([param], [target])
    return None


@dataclass
class _Choice:
    """What :func:`hold_rows` holds within its budget (see there), and the rows it keeps out."""

    tied: list[tuple[Tensor, list[LayerRule]]] = field(default_factory=list)
    loose: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    calls: list[RuleParameters] = field(default_factory=list)
    rest: list[Tensor] = field(default_factory=list)
    #: tied parameters whose rows are not held (their Gramians taken apart, :func:`tied_gramian`)
    apart: list[tuple[Tensor, list[LayerRule]]] = field(default_factory=list)


def _choose(
    calls: Sequence[RuleParameters],
    loose: list[tuple[Tensor, Tensor]],
    tied: list[tuple[Tensor, list[LayerRule]]],
    budget: int,
    count: int,
) -> _Choice:
    """The rows :func:`hold_rows` holds, in its order, up to ``budget`` bytes (a sparse
    lookup's weight is never held: its update would become dense)."""
    sparse = {id(p) for parts in calls if parts.rule.sparse_gradients for p in parts.shared}
    choice = _Choice()
    for p, rules in tied:
        size = rows_bytes(count, p)
        if id(p) not in sparse and size <= budget:
            budget -= size
            choice.tied.append((p, rules))
        else:
            choice.apart.append((p, rules))
    for p, rows in loose:
        size = rows.numel() * rows.element_size()
        if id(p) not in sparse and size <= budget:
            budget -= size
            choice.loose.append((p, rows))
        else:
            choice.rest.append(rows)
    for parts in calls:
        if not parts.alone:
            continue
        size = sum([rows_bytes(count, p) for p in parts.alone])
        if size <= budget and parts.rule.forms_rows(parts.alone):
            budget -= size
            choice.calls.append(parts)
    return choice


def hold_rows(
    calls: Sequence[RuleParameters],
    loose: list[tuple[Tensor, Tensor]],
    tied: list[tuple[Tensor, list[LayerRule]]],
    budgets: tuple[int, int],
    shape: tuple[int, int],
    lender: tuple[RowsBuffer | None, object],
) -> tuple[HeldRows, list[Tensor], set[int]]:
    """The ``b T`` rows (``shape`` is ``(b, T)``) a step holds until its update, up to
    ``budgets[0]`` bytes: first those of the ``tied`` parameters (each with the rules of the calls
    that use it: their rows are summed over the calls in ``R``, :func:`_tied_into`) and the
    ``loose`` rows (``(parameter, [b, T, *p.shape])`` of explicit parameters, formed anyway),
    whose update is dense, then those of the ``calls`` whose rules form their parameters' rows
    for the Gramian (:meth:`~.rules.LayerRule.forms_rows`; each call's parameters used by it
    alone, all or none). ``R`` comes from ``lender``: the engine's buffer (or ``None`` for a
    fresh matrix) and the step that borrows it.

    Returns the held rows, the Gram matrices ``[b, T, b, T]`` of the rows formed but not held
    (a tied parameter's over the budget by slices of at most ``budgets[1]`` bytes:
    :func:`tied_gramian`), and the ids of the ``calls`` whose rows were formed (their rules'
    Gramian terms are not to be taken again).
    """
    count = shape[0] * shape[1]
    budget, sliced = budgets
    choice = _choose(calls, loose, tied, budget, count)
    rest = [tied_gramian(p, rules, sliced) for p, rules in choice.apart]
    width = sum(p.numel() for p, _ in [*choice.tied, *choice.loose])
    width += sum(p.numel() for parts in choice.calls for p in parts.alone)
    writer = HeldRowsWriter(*lender, count, width)
    for p, rules in choice.tied:  # (in R: the other calls' rows are added to them in place)
        outside = _tied_into(writer, p, rules, shape)
        if outside is not None:
            rest.append(rows_gramian(outside))
    # (one call's rows formed at a time: those copied into R are freed before the next)
    for p, rows in itertools.chain(choice.loose, _rows_of(choice.calls)):
        if writer.put(p, rows) is None:
            rest.append(rows_gramian(rows))
    rest.extend(rows_gramian(rows) for rows in choice.rest)
    return writer.held(), rest, {id(parts) for parts in choice.calls}


def tied_gramian(param: Tensor, rules: list[LayerRule], budget: int) -> Tensor:
    r"""``Σ R Rᵀ`` of a tied parameter's rows ``R = Σ_c R_c`` summed over its calls' ``rules``,
    ``[b, T, b, T]``, without holding them: by slices of its first dimension (a vocabulary's
    rows) of at most ``budget`` bytes of rows each, ``G = Σ_slices R_s R_sᵀ``, where every rule
    forms a slice's rows (:meth:`~.rules.LayerRule.sliced_jacobians`: ``Linear``, ``Embedding``);
    else from the whole rows. A tied embedding and head of ``V × e`` (GPT-2's ``wte``) would
    otherwise form ``b T`` copies of the table at once: 1.6 GB at batch 64 for ``V = 50257``,
    ``e = 128``."""
    first = param.shape[0] if param.dim() else 1
    loss_rows = rules[0].call.b * rules[0].call.T
    per_table_row = max(1, rows_bytes(loss_rows, param) // first)
    step = max(1, budget // per_table_row)
    if step >= first:  # (one slice: the whole rows)
        return rows_gramian(summed_rows(param, rules))
    total: Tensor | None = None
    for start in range(0, first, step):
        rows = _sliced_rows(param, rules, slice(start, min(start + step, first)))
        if rows is None:  # (a rule that does not slice: the whole rows)
            return rows_gramian(summed_rows(param, rules))
        term = rows_gramian(rows)
        total = term if total is None else total.add_(term)
    assert total is not None
    return total


def _sliced_rows(param: Tensor, rules: list[LayerRule], part: slice) -> Tensor | None:
    """The rows of ``param[part]`` summed over the ``rules`` (the first's formed, the others'
    added in place: an embedding's scattered, after the rules that form theirs), or ``None``
    where one of them does not form them."""
    first, *others = sorted(rules, key=_adds_in_place)
    rows = first.sliced_jacobians(param, part)
    if rows is None:
        return None
    for rule in others:
        if not rule.add_sliced_jacobians(param, part, rows):
            return None
    return rows


def _rows_of(calls: list[RuleParameters]) -> Iterator[tuple[Tensor, Tensor]]:
    """``(parameter, rows)`` of the ``calls``' parameters used by them alone, one call's rows
    formed at a time (as they are consumed)."""
    for parts in calls:
        yield from zip(parts.alone, parts.rule.jacobians(parts.alone))


def summed_rows(param: Tensor, rules: list[LayerRule]) -> Tensor:
    """``param``'s rows summed over its calls' rules, out of place (``[b, T, *param.shape]``)."""
    total: Tensor | None = None
    for rule in rules:
        rows = rule.jacobians([param])[0]
        total = rows if total is None else total + rows
    assert total is not None
    return total
