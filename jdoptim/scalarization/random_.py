r"""Random: random loss weighting (RLW), fresh positive weights summing to one at every call.

Lin, Ye, Xu, Shi & Zhang, 2022, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR, arXiv:2111.10603 (Algorithm 2).

At each call, draw ``λ̃ ~ N(0, I_m)`` and return ``s = Σᵢ softmax(λ̃)ᵢ ℓᵢ``. The draws come from the
method's own CPU generator (in the values' dtype, then moved to their device), whose state is in
``state_dict()``, so that a checkpoint resumes the same draws; ``Random(seed=s)`` draws what
``torch.manual_seed(s)`` followed by ``torchjd.scalarization.Random()`` draws on the CPU.
The module is named ``random_`` so as not to shadow the standard ``random``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..aggregation._mixins import Stateful
from ..aggregation._randomness import _SeededRandomness
from ._base import Scalarizer


class Random(_SeededRandomness, Stateful, Scalarizer):
    r"""``s = Σᵢ softmax(λ̃)ᵢ ℓᵢ``, ``λ̃ ~ N(0, I)`` drawn at every call. Stateful (the generator).

    Args:
        seed: seed of the method's own generator (default: drawn from the global RNG, so that
            ``torch.manual_seed`` makes runs reproducible).
        generator: a CPU ``torch.Generator`` to use instead of ``seed``.
    """

    def __init__(
        self, *, seed: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        super().__init__()
        self._init_generator(seed, generator)

    def _scalarize(self, values: Tensor) -> Tensor:
        logits = torch.randn(values.numel(), generator=self._generator, dtype=values.dtype)
        weights = logits.softmax(dim=0).to(device=values.device).reshape(values.shape)
        return (weights * values).sum()
