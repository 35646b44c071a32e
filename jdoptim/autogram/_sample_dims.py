"""Where each tensor of a call indexes the samples, in per-sample mode.

By default every module tensor indexes the samples along ``batch_dim`` (an input is taken as
batched when its size there is the number of samples). Recurrent layers are the exception the
engine knows: with ``batch_first=True`` (required with ``batch_dim=0``), their sequence input and
output index samples along 0, but their hidden states (``h₀``/``hₙ``, ``c₀``/``cₙ``, shape
``[layers, batch, hidden]``) along 1. And ``MultiheadAttention``'s attention weights (its second
output, with the default ``need_weights=True``) are ``[batch, L, S]`` (or ``[batch, heads, L,
S]``) whatever its ``batch_first``: a sequence-first model's attention (``batch_dim=1``, ``[L,
batch, E]`` activations) holds the samples along 0 there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from ._records import CallRecord


def output_sample_dims(record: CallRecord, batch_dim: int) -> list[int]:
    module = record.module
    if isinstance(module, nn.RNNBase):
        return [batch_dim if t.leaf_index == 0 else 1 for t in record.tapped]
    if isinstance(module, nn.MultiheadAttention) and not module.batch_first:
        return [batch_dim if t.leaf_index == 0 else 0 for t in record.tapped]
    return [batch_dim] * len(record.tapped)


def input_sample_dims(
    module: nn.Module, flat_inputs: Sequence[Any], batch_dim: int, count: int
) -> list[int | None]:
    dims: list[int | None] = []
    first = True
    for t in flat_inputs:
        if not isinstance(t, Tensor):
            dims.append(None)
            continue
        dim = batch_dim if first or not isinstance(module, nn.RNNBase) else 1
        first = False
        dims.append(dim if t.dim() > dim and t.shape[dim] == count else None)
    return dims


def samples_at_batch_dim(losses: Tensor, batch_dim: int | None) -> Tensor:
    """A vector of per-sample losses ``[b]`` seen with its samples along ``batch_dim``
    (``[1, …, 1, b]``), where the model's tensors index the samples along a later dimension (a
    sequence-first model: ``batch_first=False`` attention, ``[s, b, d]`` activations); any other
    losses as they are. A view: the same graph, rows and weights, and the same ``[b, b]``
    Gramian once flattened."""
    if batch_dim is None or losses.dim() != 1 or batch_dim == 0:
        return losses
    return losses.reshape((1,) * batch_dim + tuple(losses.shape))
