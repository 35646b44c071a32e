r"""Sparse Jacobian blocks (``nn.Embedding(sparse=True)``, ``F.embedding(..., sparse=True)``)
in compact form, and their updates back in the layout autograd gives.

The gradient of a sparse embedding with respect to its ``[V, d]`` weight is a sparse COO tensor
holding the rows that were looked up. Its Jacobian block over ``m`` losses, ``[m, V, d]``, is zero
outside the ``R`` rows that some loss looked up, so everything JD computes from it depends only
on the compact block ``C ∈ R^{m×R×d}`` of those rows:

.. math::  J_p J_pᵀ = C C^{\top} \ (\text{flattened}),\qquad wᵀJ_p = \operatorname{scatter}(wᵀC),

and the update of the weight is the sparse tensor with the ``R`` rows of ``wᵀC``: the rows a plain
``backward()`` of ``Σᵢ wᵢ ℓᵢ`` would give (coalesced; a row looked up with a zero gradient is kept,
as autograd keeps it, so a sparse optimizer such as ``SparseAdam`` updates the same rows). Nothing
of size ``V`` is ever dense, which matters for the large tables of recommendation models.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CompactRows", "compact_rows", "dense"]


class CompactRows:
    """The looked-up rows of a sparse ``[m, V, *rest]`` Jacobian block: ``rows`` (``[R]``, sorted)
    and ``block`` (``[m, R, *rest]``, dense), with the full ``shape`` of one gradient."""

    def __init__(self, rows: Tensor, block: Tensor, shape: torch.Size) -> None:
        self.rows = rows
        self.block = block
        self.shape = shape

    def expand(self, compact: Tensor) -> Tensor:
        """A gradient ``[R, *rest]`` on the rows, as the sparse ``[V, *rest]`` tensor."""
        return torch.sparse_coo_tensor(
            self.rows.unsqueeze(0), compact, self.shape, is_coalesced=True, check_invariants=False
        )


def dense(tensor: Tensor) -> Tensor:
    """``tensor`` itself if it is strided, else its dense copy (where the sparse layout cannot be
    kept: a whole Jacobian exchanged between processes, autograd's rows of a parameter used
    outside the hooked calls, a re-run module's rows)."""
    return tensor if tensor.layout is torch.strided else tensor.to_dense()


def compact_rows(block: Tensor) -> CompactRows | None:
    """The compact form of a sparse COO Jacobian block ``[m, V, *rest]`` whose first two
    dimensions are sparse (as autograd stacks the gradients of a sparse embedding), or ``None``
    for any other layout."""
    if block.layout is not torch.sparse_coo or block.sparse_dim() != 2:
        return None
    block = block.coalesce()
    indices, values = block.indices(), block.values()
    rows, position = torch.unique(indices[1], sorted=True, return_inverse=True)
    dense = values.new_zeros((block.shape[0], rows.numel(), *block.shape[2:]))
    dense[indices[0], position] = values  # coalesced: each (loss, row) pair once
    return CompactRows(rows, dense, block.shape[1:])
