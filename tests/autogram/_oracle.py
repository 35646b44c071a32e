"""Independent oracles: explicit Jacobians by one ``autograd.grad`` per loss, and their Gramians."""

from __future__ import annotations

import torch
from torch import Tensor


def explicit_jacobian(losses: Tensor, params: list[Tensor]) -> Tensor:
    """``J`` of shape ``[N, n]``: row ``i`` is the gradient of ``losses.reshape(-1)[i]``."""
    flat = losses.reshape(-1)
    rows = []
    for i in range(flat.numel()):
        grads = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def explicit_gramian(losses: Tensor, params: list[Tensor]) -> Tensor:
    """``J Jᵀ`` as ``[N, N]`` (row-major order of ``losses``)."""
    jacobian = explicit_jacobian(losses, params).double()
    return jacobian @ jacobian.T


def as_square(gramian: Tensor, shape: tuple[int, ...]) -> Tensor:
    """The engine's (generalized) Gramian as ``[N, N]``, by plain indexing (not the code under
    test): ``G[a₁..a_k, c_k..c₁] → square[flat(a), flat(c)]``."""
    k = len(shape)
    n = 1
    for s in shape:
        n *= s
    square = torch.empty(n, n, dtype=gramian.dtype)
    indices = list(torch.cartesian_prod(*(torch.arange(s) for s in shape)).reshape(n, k))
    for a, ia in enumerate(indices):
        for c, ic in enumerate(indices):
            square[a, c] = gramian[tuple(ia.tolist()) + tuple(reversed(ic.tolist()))]
    return square


def assert_gramian_close(actual: Tensor, expected: Tensor, rtol: float = 1e-5) -> None:
    scale = expected.abs().max().clamp_min(1e-12)
    error = (actual.double() - expected.double()).abs().max() / scale
    assert error < rtol, f"relative error {error:.3g}"
