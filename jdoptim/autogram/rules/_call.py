r"""The view of one module call that a layer rule works on.

Rows. The losses are laid out as ``[b, T]``: ``b`` independent samples (``b = 1`` without
``batch_dim``) times ``T`` losses per sample (``T = m`` without ``batch_dim``; ``1`` for per-sample
losses; the number of tasks for a ``[batch, tasks]`` matrix). Loss ``(i, k)`` depends on sample
``i`` of every module tensor only (that is what ``batch_dim`` promises). For each tensor output
``Y`` of the call, the engine's backward gives ``D[k] = ∂(Σᵢ ℓ_{ik}) / ∂Y`` (shape
``[T, *Y.shape]``), whose sample-``i`` slice is ``∂ℓ_{ik}/∂Y[i]``. A rule turns these into,
for each parameter ``p``:

* ``jacobians``: the rows ``∂ℓ_{ik}/∂p`` as a tensor ``[b, T, *p.shape]``;
* ``gramian``: its contribution ``G[i, k, j, l] = ⟨∂ℓ_{ik}/∂p, ∂ℓ_{jl}/∂p⟩`` (``[b, T, b, T]``),
  possibly without ever forming the rows;
* ``weighted``: ``Σ_{i,k} w_{ik} ∂ℓ_{ik}/∂p``, which is the vector-Jacobian product of the call
  with the weighted output gradient ``Σ_k w_{·k} D[k]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._records import CallRecord


def full_precision(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 when it is float16/bfloat16 (e.g. recorded under autocast).

    The Gramian sums products of many activations and output gradients; accumulated in half
    precision it loses positive semi-definiteness, which the QP-based weightings then have to
    repair with a large ridge. The contraction is therefore always done in at least float32.
    """
    if tensor.dtype in (torch.float16, torch.bfloat16):
        return tensor.float()
    return tensor


@dataclass(eq=False)
class Call:
    r"""One recorded call of a module, with what the engine's backward pass gave for it.

    Attributes:
        record: the call as the forward hook recorded it (its module, ``args``, ``kwargs``,
            the tensor outputs it computed).
        grads: per tensor output ``Y``, ``D = [∂(Σᵢ ℓ_{ik})/∂Y for k < T]`` (``[T, *Y.shape]``), or
            ``None`` where no loss reaches it; read it with :meth:`grad` or
            :meth:`grad_samples_first`, which handle the layouts.
        params: the module's parameters this step differentiates.
        batch_dim: the dimension of the module's tensors that indexes the samples, or ``None``
            (task mode: one "sample", ``b = 1``).
        b: the number of samples; ``T``: the number of losses per sample.
        out_dims: per tensor output, the dimension that indexes the samples (where it is not
            ``batch_dim``).
        stacked: whether ``grads`` have their row dimension (with ``T = 1`` the engine passes
            them as autograd gave them, and :meth:`grad` adds it).
        group: how many consecutive entries of the sample dimension each sample owns: ``1``
            when the call's tensors index the samples there, ``k > 1`` when the samples are
            folded together with another dimension, sample-major (``b·k`` entries, sample
            ``i`` owning entries ``i·k … i·k + k − 1``: OPT's ``x.reshape(-1, d)`` over
            ``[b, s, d]`` tokens, Swin's ``[b·windows, …]``). Rules reading the sample
            dimension as ``reshape(b, -1, …)`` see each sample's ``k`` entries together; a
            rule that does not declare :attr:`~._base.LayerRule.grouped_samples` is not given
            such calls.
    """

    record: CallRecord
    grads: list[Tensor | None]  # per tapped output: [T, *shape], None where no loss reaches it
    params: list[Tensor]  # the parameters of the module this step differentiates
    batch_dim: int | None  # the sample dimension of the module's tensors (per-sample mode)
    b: int
    T: int
    out_dims: list[int] | None = None  # per tapped output, where it indexes the samples
    stacked: bool = True  # whether ``grads`` have their row dimension
    group: int = 1  # entries of the sample dimension per sample (sample-major)
    #: per tapped output, when the outputs fold the samples differently (the generic rule's)
    groups: tuple[int, ...] | None = None
    #: for a call on entries gathered from the samples' (``h[index]``: a mixture-of-experts'
    #: expert on its tokens), the sample of each entry of its sample dimension, in any order;
    #: the generic rule's (a layer rule is given the call laid out sample-major instead)
    rows: Tensor | None = None

    def group_of(self, index: int) -> int:
        """The entries of tapped output ``index``'s sample dimension each sample owns."""
        return self.group if self.groups is None else self.groups[index]

    def out_dim(self, index: int) -> int | None:
        if self.batch_dim is None:
            return None
        return self.batch_dim if self.out_dims is None else self.out_dims[index]

    def sample_out_dim(self, index: int) -> int:
        """The dimension of tapped output ``index`` that indexes the samples (per-sample mode)."""
        dim = self.out_dim(index)
        if dim is None:
            raise ValueError("Call.sample_out_dim needs a call recorded with a batch_dim.")
        return dim

    @property
    def module(self) -> torch.nn.Module:
        """The called module."""
        return self.record.module

    @property
    def args(self) -> tuple[Any, ...]:
        """The call's positional arguments as recorded (tensors not detached: the engine runs
        rules under ``no_grad``)."""
        return self.record.args

    @property
    def kwargs(self) -> dict[str, Any]:
        """The call's keyword arguments as recorded."""
        return self.record.kwargs

    def grad(self, index: int) -> Tensor:
        """``D`` of tapped output ``index``, ``[T, *shape]`` (zeros where no loss reaches it),
        in at least float32 (see :func:`full_precision`)."""
        grad = self.grads[index]
        if grad is None:
            tapped = self.record.tapped[index]
            grad = torch.zeros((self.T, *tapped.shape), dtype=tapped.dtype, device=tapped.device)
        elif not self.stacked:
            grad = grad.unsqueeze(0)
        return full_precision(grad)

    def samples_first(self, tensor: Tensor) -> Tensor:
        """A module tensor with its sample dimension first (a new one of size 1 if none)."""
        if self.batch_dim is None:
            return tensor.unsqueeze(0)
        return tensor if self.batch_dim == 0 else tensor.movedim(self.batch_dim, 0)

    def grad_samples_first(self, index: int, *shape: int) -> Tensor:
        """``D`` of output ``index`` as ``[T, b, ...]``; with ``shape``, reshaped to
        ``[T, b, *shape]`` (one operation for a gradient as autograd gave it, samples first:
        the rules ask for it in every call of every step)."""
        dim = self.out_dim(index)
        raw = self.grads[index]
        if shape and raw is not None and not self.stacked and dim == 0:
            return full_precision(raw).reshape(self.T, self.b, *shape)
        grad = self.grad(index)
        if dim is None:
            grad = grad.unsqueeze(1)
        elif dim != 0:
            grad = grad.movedim(dim + 1, 1)
        return grad.reshape(self.T, self.b, *shape) if shape else grad

    def weighted_grad(self, index: int, weights: Tensor) -> Tensor:
        """``Σ_k w_{·k} D[k]`` in the layout of the output (``weights`` is ``[b, T]``; with
        :attr:`group` ``k > 1``, each sample's weight applies to its ``k`` entries)."""
        grad = self.grad(index)
        dim = self.out_dim(index)
        if dim is None:  # one sample: [1, T] @ [T, N]
            summed = torch.mm(weights.to(grad.dtype), grad.reshape(self.T, -1))
            return summed.view(grad.shape[1:])
        group = self.group_of(index)
        entries = self.b * group
        if group > 1:  # [b, T] → [b·k, T], sample-major
            weights = weights.repeat_interleave(group, dim=0)
        if self.T == 1 and dim == 0:  # per-sample losses: w_i D_i
            return grad[0] * weights.to(grad.dtype).view(entries, *(1,) * (grad.dim() - 2))
        moved = grad.movedim(dim + 1, 1)  # [T, b(·k), ...]
        shape = (self.T, entries) + (1,) * (moved.dim() - 2)
        summed = (moved * weights.T.to(grad.dtype).reshape(shape)).sum(0)
        return summed.movedim(0, dim)
