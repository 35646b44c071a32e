"""Independent computations the tests compare jdoptim against."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import lsq_linear
from torch import Tensor


def explicit_jacobian(losses: list[Tensor], params: list[Tensor]) -> Tensor:
    """``J`` of shape ``[m, Σ numel]``, one ``autograd.grad`` per loss (zeros where unused)."""
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows)


def dual_cone_weights(jacobian: Tensor, lower_bound: np.ndarray) -> np.ndarray:
    """``argmin_{v ≥ u} ‖Jᵀ v‖²`` as a bounded least-squares problem (scipy, not quadprog)."""
    a = jacobian.detach().double().numpy().T
    result = lsq_linear(
        a,
        np.zeros(a.shape[0]),
        bounds=(lower_bound, np.full_like(lower_bound, np.inf)),
        tol=1e-12,
        lsmr_tol="auto",
        max_iter=10_000,
    )
    return result.x


def upgrad_weights(jacobian: Tensor) -> Tensor:
    """UPGrad's weights: ``Σᵢ argmin_{v ≥ eᵢ/m} ‖Jᵀv‖²`` (Quinton & Rey, 2024)."""
    m = jacobian.shape[0]
    total = sum(dual_cone_weights(jacobian, np.eye(m)[i] / m) for i in range(m))
    return torch.as_tensor(total, dtype=jacobian.dtype)


def split_like(vector: Tensor, params: list[Tensor]) -> list[Tensor]:
    return [piece.view_as(p) for piece, p in zip(vector.split([p.numel() for p in params]), params)]
