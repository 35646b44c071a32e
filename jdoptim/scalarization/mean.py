r"""Mean: the average of the losses, ``s = (1/m) Σᵢ ℓᵢ`` (every effective weight is ``1/m``)."""

from __future__ import annotations

from torch import Tensor

from ._base import Scalarizer


class Mean(Scalarizer):
    r"""``s = (1/m) Σᵢ ℓᵢ`` over the ``m`` values (equal weights ``1/m``). Stateless."""

    def _scalarize(self, values: Tensor) -> Tensor:
        return values.mean()
