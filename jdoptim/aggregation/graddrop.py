r"""GradDrop: Gradient Sign Dropout (Chen et al., 2020, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS, arXiv:2010.06808).

Coordinate-wise: for every coordinate ``k`` of the parameter vector, the *positive sign purity*

.. math::  P_k = \tfrac12 \Bigl(1 + \frac{\sum_i J_{ik}}{\sum_i |J_{ik}|}\Bigr) \in [0, 1]

measures how much the losses agree on the sign of the gradient. A threshold ``U_k ~ U(0, 1)`` is
drawn per coordinate; the positive entries of column ``k`` are kept if ``P_k > U_k`` and the
negative ones if ``P_k < U_k``:

.. math::  M_{ik} = \mathbb 1[P_k > U_k]\,\mathbb 1[J_{ik} > 0] + \mathbb 1[P_k < U_k]\,
           \mathbb 1[J_{ik} < 0], \qquad d_k = \sum_i \bigl(ℓ_i + (1-ℓ_i) M_{ik}\bigr) J_{ik},

with the per-loss *leak* ``ℓ_i ∈ [0, 1]`` (default ``0``: pure GradDrop; ``1``: plain sum) of the
paper. Columns that are entirely zero give ``P_k = ½`` and ``d_k = 0``.

**Simplification.** The paper applies GradDrop to the gradients with respect to a layer's
*activations*, summed over the batch after multiplying by the sign of the layer's inputs, and
back-propagates the masked gradient from there. We apply it directly to the rows of the Jacobian
with respect to the shared parameters (as most re-implementations do), which needs no model
surgery. The paper's optional monotone transform of ``P`` is not offered (it is the identity).

GradDrop needs the Jacobian (it is coordinate-wise, not a function of the Gramian), so it is an
:class:`~jdoptim.aggregation.Aggregator` only; :class:`jdoptim.JDOptimizer` computes the Jacobian
for it. It is randomised and non-differentiable; the thresholds come from the method's own seeded
generator, whose state is checkpointed with ``state_dict()``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg.finite import is_finite
from ._bases import Aggregator
from ._mixins import Stateful, _NonDifferentiable
from ._randomness import _SeededRandomness
from ._scaling import normalized_jacobian


class GradDrop(_NonDifferentiable, _SeededRandomness, Stateful, Aggregator):
    """GradDrop aggregator (see the module docstring).

    Args:
        leak: per-loss leak ``ℓ ∈ [0, 1]^m`` (default: none, i.e. ``ℓ = 0``).
        seed: seed of the method's own generator (default: drawn from the global RNG).
        generator: a CPU ``torch.Generator`` to use instead of ``seed``.
    """

    leak: Tensor | None

    def __init__(
        self,
        leak: Tensor | None = None,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if leak is not None:
            if not isinstance(leak, Tensor) or leak.dim() != 1:
                raise ValueError("`leak` must be a 1-D tensor with one entry per loss.")
            if not is_finite(leak) or (leak < 0).any() or (leak > 1).any():
                raise ValueError(f"Every leak must lie in [0, 1], got {leak.tolist()}.")
        super().__init__()
        self.register_buffer("leak", None if leak is None else leak.detach().clone())
        self._init_generator(seed, generator)

    def forward(self, matrix: Tensor) -> Tensor:
        m, n = matrix.shape
        if self.leak is not None and self.leak.shape[0] != m:
            raise ValueError(
                f"`leak` has {self.leak.shape[0]} entries but there are {m} losses: give one "
                "entry per loss."
            )
        normalized, _ = normalized_jacobian(matrix)  # P does not depend on the scale
        column_sum = normalized.sum(dim=0)
        column_abs_sum = normalized.abs().sum(dim=0)
        safe_abs_sum = torch.where(column_abs_sum > 0, column_abs_sum, 1.0)
        purity = 0.5 * (1.0 + column_sum / safe_abs_sum)
        # Drawn in float64 whatever the Jacobian's dtype: the same seed makes the same choices.
        thresholds = torch.rand(n, generator=self._generator, dtype=torch.float64)
        thresholds = thresholds.to(matrix.device)
        purity = purity.to(torch.float64)
        keep_positive = (purity > thresholds) & (matrix > 0)
        keep_negative = (purity < thresholds) & (matrix < 0)
        mask = (keep_positive | keep_negative).to(matrix.dtype)
        if self.leak is not None:
            leak = self.leak.to(dtype=matrix.dtype, device=matrix.device).unsqueeze(1)
            mask = leak + (1.0 - leak) * mask
        return (mask * matrix).sum(dim=0)

    def extra_repr(self) -> str:
        leak = None if self.leak is None else self.leak.tolist()
        return f"leak={leak}"
