r"""Random loss weighting, RLW (Lin, Ye, Xu, Shi & Zhang, 2022, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR, arXiv:2111.10603).

At every call, draw ``λ̃ ~ N(0, I_m)`` and use the weights ``w = softmax(λ̃)`` (positive, summing
to ``1``), i.e. ``d = Σᵢ wᵢ gᵢ``. The normal distribution followed by a softmax is the paper's main
variant (it also studies uniform, Bernoulli, Dirichlet… draws); only it is offered here.

The draws come from the method's own seeded CPU generator, whose state is checkpointed with
``state_dict()``; the module is named ``random_`` so as not to shadow the standard ``random``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._bases import GramianWeightedAggregator, Weighting
from ._mixins import Stateful, _NonDifferentiable
from ._randomness import _SeededRandomness
from ._scaling import scale_free
from .state import DeclaredState


class RandomWeighting(_NonDifferentiable, _SeededRandomness, Stateful, Weighting):
    """Weights ``softmax(λ̃)`` with ``λ̃ ~ N(0, I_m)`` drawn at every call (RLW).

    Args:
        seed: seed of the method's own generator (default: drawn from the global RNG).
        generator: a CPU ``torch.Generator`` to use instead of ``seed``.
    """

    def __init__(
        self, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self._init_generator(seed, generator)

    scale_degree = 0.0

    @scale_free
    def forward(self, gramian: Tensor) -> Tensor:
        m = gramian.shape[0]
        logits = torch.randn(m, generator=self._generator, dtype=torch.float64)
        return logits.softmax(dim=0).to(dtype=gramian.dtype, device=gramian.device)


class Random(_NonDifferentiable, DeclaredState, Stateful, GramianWeightedAggregator):
    """RLW aggregator: ``d = Jᵀ RandomWeighting(J Jᵀ)`` (the weights ignore the Gramian's values).

    Args: see :class:`RandomWeighting`.
    """

    weighting: RandomWeighting

    def __init__(
        self, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__(RandomWeighting(seed=seed, generator=generator))
