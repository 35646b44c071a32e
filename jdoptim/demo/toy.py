r"""The two-objective toy problem of CAGrad (Liu et al., 2021, "Conflict-Averse Gradient Descent
for Multi-task Learning", NeurIPS) also used by Nash-MTL (Navon et al., 2022).

For ``x = (x₁, x₂)``, with ``c₁ = max(tanh(x₂/2), 0)`` and ``c₂ = max(tanh(-x₂/2), 0)``:

.. math::
    f_1(x) = c_1 \,[\log\max(|\tfrac12(-x_1-7) - \tanh(-x_2)|, 5·10^{-6}) + 6]
             + c_2 \,[((x_1-7)^2 + 0.1 (x_2+8)^2)/10 - 20]

    f_2(x) = c_1 \,[\log\max(|\tfrac12(-x_1+3) + \tanh(-x_2) + 2|, 5·10^{-6}) + 6]
             + c_2 \,[((x_1+7)^2 + 0.1 (x_2+8)^2)/10 - 20]

Its Pareto set is, within 0.05, the segment ``x₂ = -8.4``, ``-7 ≤ x₁ ≤ 7`` (where both
``∂fᵢ/∂x₂`` vanish). What the problem shows does not depend on the budget:

* the summed loss has a single minimiser on the set, its middle ``x₁ = 0``: from every start it
  slides there, slowly through the flat valley of the upper region (it stalls there for good at
  the papers' small learning rate);
* Jacobian descent with a non-conflicting method stops at the first Pareto-optimal point it
  reaches (no update there improves one loss without worsening the other), so it ends at a
  trade-off that depends on the start, and it gets there sooner.

The original runs use Adam with ``lr=1e-3`` for tens of thousands of steps; the demo uses a larger
rate and fewer steps, which gives the same picture in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..optimizer import JDOptimizer
from .methods import BASELINE, make_aggregator

__all__ = [
    "STARTS",
    "ToyResult",
    "distance_to_pareto_set",
    "objectives",
    "optimise",
]

STARTS: tuple[tuple[float, float], ...] = (
    (-8.5, 7.5),
    (0.0, 0.0),
    (9.0, 9.0),
    (-7.5, -0.5),
    (9.0, -1.0),
)
"""The starting points of the CAGrad and Nash-MTL figures."""

_LOWER = 5e-6
PARETO_X2 = -8.4
"""The Pareto set is, within 0.05, the segment ``x₂ = -8.4``, ``-7 ≤ x₁ ≤ 7``."""


def objectives(x: Tensor, scales: tuple[float, float] = (1.0, 1.0)) -> tuple[Tensor, Tensor]:
    """``(f₁(x), f₂(x))`` for ``x`` of shape ``[..., 2]`` (see the module docstring)."""
    x1, x2 = x[..., 0], x[..., 1]
    f1 = torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), _LOWER).log() + 6
    f2 = torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), _LOWER).log() + 6
    c1 = torch.clamp(torch.tanh(x2 * 0.5), 0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    c2 = torch.clamp(torch.tanh(-x2 * 0.5), 0)
    return scales[0] * (f1 * c1 + f1_sq * c2), scales[1] * (f2 * c1 + f2_sq * c2)


def distance_to_pareto_set(x: Tensor) -> Tensor:
    """Euclidean distance from ``x`` (shape ``[..., 2]``) to the segment ``x₂=-8.4, |x₁|≤7``."""
    beyond = (x[..., 0].abs() - 7).clamp(min=0)
    return torch.sqrt(beyond**2 + (x[..., 1] - PARETO_X2) ** 2)


@dataclass
class ToyResult:
    """One method's trajectories: ``paths[k]`` is ``[steps + 1, 2]`` from ``STARTS[k]``."""

    method: str
    paths: list[Tensor]
    seconds: float

    @property
    def finals(self) -> Tensor:
        return torch.stack([path[-1] for path in self.paths])

    def reached(self, tolerance: float = 0.3) -> list[bool]:
        """Whether each trajectory ended within ``tolerance`` of the Pareto set."""
        return (distance_to_pareto_set(self.finals) < tolerance).tolist()

    def steps_to_reach(self, tolerance: float = 0.3) -> list[int | None]:
        """For each trajectory, the first step that ended within ``tolerance`` of the Pareto set
        (``None`` if none did)."""
        firsts: list[int | None] = []
        for path in self.paths:
            inside = (distance_to_pareto_set(path) < tolerance).nonzero()
            firsts.append(int(inside[0, 0]) if len(inside) else None)
        return firsts


def optimise(
    method: str,
    starts: tuple[tuple[float, float], ...] = STARTS,
    steps: int = 500,
    lr: float = 0.1,
    scales: tuple[float, float] = (1.0, 1.0),
    on_step: Callable[[], None] | None = None,
) -> ToyResult:
    """Run Adam (``method="Sum"``) or ``JDOptimizer(Adam)`` from each starting point.

    Adam uses ``betas=(0.9, 0.99)``: its shorter memory lets it speed up on the flat floor of
    the lower region, where the gradients are 100× smaller than on the way down.
    """
    begin = time.perf_counter()
    paths = []
    for start in starts:
        x = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        adam = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.99))
        jd = None if method == BASELINE else JDOptimizer(adam, make_aggregator(method, 2))
        path = [x.detach().clone()]
        for _ in range(steps):
            f1, f2 = objectives(x, scales)
            adam.zero_grad()
            if jd is None:
                (f1 + f2).backward()
                adam.step()
            else:
                jd.step([f1, f2])
            path.append(x.detach().clone())
            if on_step is not None:
                on_step()
        paths.append(torch.stack(path))
    return ToyResult(method, paths, time.perf_counter() - begin)
