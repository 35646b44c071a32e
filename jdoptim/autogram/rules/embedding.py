r"""``nn.Embedding`` (no ``max_norm``, no ``scale_grad_by_freq``).

An embedding is a ``Linear`` layer on one-hot inputs, so ``K[i,s,j,r] = [idx_{is} = idx_{jr}]``
(zero at ``padding_idx``, whose row gets no gradient), and the Gramian is the kernel contraction of
:mod:`._contraction` (one :class:`~._terms.IndexTerm`, which the distributed engine exchanges as
indices and output gradients) without ever forming a ``[V, e]`` gradient per row; over many
positions, only the pairs of positions that read the same row (:mod:`._index_pairs`). A small table
read at many positions (a position embedding, ``V = S``) has cheaper explicit rows than that
contraction (:meth:`EmbeddingRule.rows_are_cheaper`): its Gramian then takes the rows, which the
step holds for the update (:mod:`jdoptim.autogram._held_rows`). Rows (also needed when the
weight is tied into another call) and the update scatter the output gradients into the looked-up
rows; for ``sparse=True`` the update is a sparse tensor of the looked-up rows, as ``backward()``
gives it, and the Gramian always contracts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._base import LayerRule, register_rule
from ._call import Call
from ._contraction import (
    contraction_cost,
    contraction_memory,
    explicit_memory,
    fewest_entries_wanted,
)
from ._terms import GramianTerm, IndexTerm, RowsTerm

#: :func:`_row_numbers` already made, by ``(rows, positions, device)`` (a model's steps ask for
#: the same few every time; at most :data:`_MAX_ROW_NUMBERS` are kept).
_ROW_NUMBERS: dict[tuple[int, int, torch.device], Tensor] = {}
_MAX_ROW_NUMBERS = 64


def _row_numbers(rows: int, positions: int, device: torch.device) -> Tensor:
    """``[0, …, 0, 1, …, 1, …]``: each row number ``0 … rows − 1`` repeated ``positions``
    times, the row of each looked-up entry in the scatter of :meth:`EmbeddingRule.add_jacobians`
    (made once per shape: it is the same at every step, and making it is a few operations)."""
    key = (rows, positions, device)
    found = _ROW_NUMBERS.get(key)
    if found is None:
        if len(_ROW_NUMBERS) >= _MAX_ROW_NUMBERS:
            _ROW_NUMBERS.clear()
        found = torch.arange(rows, device=device).repeat_interleave(positions)
        _ROW_NUMBERS[key] = found
    return found


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule[nn.Embedding]):
    grouped_samples = True  # positions folded into the sample dimension are more positions

    @classmethod
    def applies(cls, call: Call) -> bool:
        module = cls.module_of(call)
        index = call.record.sole_input
        if index is None:
            return False
        if module.max_norm is not None or module.scale_grad_by_freq:
            return False
        if not cls.differentiates_attributes(call, "weight"):
            return False
        return call.batch_dim is None or call.batch_dim < index.dim()

    def __init__(self, call: Call) -> None:
        super().__init__(call)
        module = self.module
        self.size = module.num_embeddings
        index = call.record.args[0]
        self.index = call.samples_first(index).reshape(call.b, -1)  # [b, S]
        padding = module.padding_idx
        self.valid = None if padding is None else self.index.ne(padding)
        dim = module.embedding_dim
        self.grads = call.grad_samples_first(0, -1, dim)
        if self.valid is not None:
            self.grads = self.grads * self.valid[None, :, :, None].to(self.grads.dtype)

    def jacobians(self, params: list[Tensor]) -> list[Tensor]:
        """Rows ``[b, T, V, e]``: row ``(i, k)`` has ``Σ_{s: idx_{is} = v} D[k, i, s]`` at ``v``,
        scattered into zeros by :meth:`add_jacobians` (no ``[b, S, V]`` one-hot, whose size
        grows with the vocabulary times the positions)."""
        t, b, _, e = self.grads.shape
        rows = self.grads.new_zeros(b, t, self.size, e)
        self.add_jacobians(params[:1], [rows])
        return [rows for _ in params]

    def add_jacobians(self, params: list[Tensor], into: list[Tensor]) -> None:
        """The rows of :meth:`jacobians` added to ``into`` by one accumulating scatter of the
        ``b T S`` looked-up rows (for a tied weight, its rows from the other calls are there
        already: no ``[b, T, V, e]`` zeros of its own, no sum out of place)."""
        t, b, _, e = self.grads.shape
        values, tokens, row = self._looked_up()
        for target in into:
            flat = target.view(b * t, self.size, e)
            flat.index_put_((row, tokens), values.to(flat.dtype), accumulate=True)

    def sliced_jacobians(self, param: Tensor, part: slice) -> Tensor | None:
        """The rows of the table's rows ``part``: the positions that read one of them,
        scattered into zeros (the others contribute nothing there)."""
        start, stop, _ = part.indices(self.size)
        t, b, _, e = self.grads.shape
        rows = self.grads.new_zeros(b, t, stop - start, e)
        self.add_sliced_jacobians(param, part, rows)
        return rows

    def add_sliced_jacobians(self, param: Tensor, part: slice, into: Tensor) -> bool:
        start, stop, _ = part.indices(self.size)
        values, tokens, row = self._looked_up()
        inside = (tokens >= start) & (tokens < stop)
        flat = into.view(-1, stop - start, values.shape[-1])
        index = (row[inside], tokens[inside] - start)
        flat.index_put_(index, values[inside].to(flat.dtype), accumulate=True)
        return True

    def _looked_up(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(values, tokens, row)`` of the ``b T S`` looked-up entries: each output gradient,
        the table row it goes to, and its loss row ``(i, k)`` (flat, ``[b, T]`` order)."""
        t, b, s, e = self.grads.shape
        if t == 1:  # (per-sample losses: the orders agree, fewer operations)
            values, tokens = self.grads.reshape(b * s, e), self.index.reshape(-1)
        else:
            values = self.grads.transpose(0, 1).reshape(b * t * s, e)  # [b, T, S, e] order
            tokens = self.index[:, None, :].expand(b, t, s).reshape(-1)
        return values, tokens, _row_numbers(b * t, s, self.index.device)

    @property
    def sparse_gradients(self) -> bool:
        return self.module.sparse

    def factorisation(self, params: list[Tensor]) -> list[GramianTerm]:
        """One :class:`~._terms.IndexTerm` of the indices and the (padding-masked) ``D``; or,
        where they cost less (:meth:`rows_are_cheaper`), the explicit rows."""
        if self.rows_are_cheaper():
            return [RowsTerm(rows) for rows in self.jacobians(params)]
        return [IndexTerm(self.index, self.grads)]

    def forms_rows(self, params: list[Tensor]) -> bool:
        return self.rows_are_cheaper()  # (without forming them, as the factorisation would)

    def rows_are_cheaper(self) -> bool:
        r"""Whether the ``b T`` explicit rows of ``V e`` entries cost fewer flops than the index
        kernel's contraction over the ``b S`` positions (or, inside
        :func:`~._contraction.fewest_entries`, form fewer entries), for a dense gradient.

        Rows: zero ``b T V e`` entries, scatter ``b T S e``, their Gram matrix
        ``(b T)² V e``. Kernel: :func:`~._contraction.contraction_cost` with a one-entry input
        (the index comparison). A small table read at every position of every sample (a
        position embedding: ``V = S``) takes the rows, a vocabulary the kernel.
        """
        if self.module.sparse:  # (its update is sparse: rows would make it dense)
            return False
        t, b, s, e = self.grads.shape
        if fewest_entries_wanted():
            return explicit_memory(b, t, self.size, e) < contraction_memory(b, s, t, e)
        rows = b * t * (s + self.size) * e + (b * t) ** 2 * self.size * e
        return rows < contraction_cost(b, s, t, 1, e)

    def weighted(self, params: list[Tensor], weights: Tensor) -> list[Tensor]:
        module = self.module
        dw = self.call.weighted_grad(0, weights).reshape(-1, module.embedding_dim)
        index = self.call.record.args[0].reshape(-1)
        grad = scattered_update(index, dw, self.size, module.padding_idx, module.sparse)
        return [grad for _ in params]


def scattered_update(
    index: Tensor, values: Tensor, size: int, padding: int | None, sparse: bool
) -> Tensor:
    """A table's gradient from ``values[t]`` (``[n, e]``) added at row ``index[t]``: for a
    ``sparse`` table, as autograd gives it, a sparse tensor of the looked-up rows with
    ``padding``'s entries left out; else dense, ``padding``'s entries zeroed."""
    if sparse:
        if padding is not None:
            kept = index.ne(padding)
            index, values = index[kept], values[kept]
        shape = (size, values.shape[-1])
        return torch.sparse_coo_tensor(index[None], values, shape, check_invariants=False)
    if padding is not None:
        values = values * index.ne(padding)[:, None].to(values.dtype)
    grad = torch.zeros(size, values.shape[-1], dtype=values.dtype, device=values.device)
    return grad.index_add_(0, index, values)
