r"""Sum: the plain sum of the losses, ``s = Σᵢ ℓᵢ`` (every effective weight is ``1``)."""

from __future__ import annotations

from torch import Tensor

from ._base import Scalarizer


class Sum(Scalarizer):
    r"""``s = Σᵢ ℓᵢ``: the usual multi-task baseline (equal weights of ``1``). Stateless."""

    def _scalarize(self, values: Tensor) -> Tensor:
        return values.sum()
