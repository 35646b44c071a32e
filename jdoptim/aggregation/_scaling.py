r"""Scale and precision of the inputs of aggregators and weightings.

**Scale.** Most methods' weights do not depend on the scale of the gradients: ``W(tG) = W(G)``
for ``t > 0`` (MGDA, UPGrad, IMTL-G, ConFIG, …); some follow a power law ``W(tG) = t^k W(G)``
(FairGrad: ``k = -α/(1+α)``). A :class:`~jdoptim.aggregation.Weighting` declares ``k`` in its
class attribute ``scale_degree`` (``None``: no such law). Numerically, though, a Gramian of
gradients of size ``1e-30`` (float32) or ``1e-200`` (float64) underflows, one of gradients of
size ``1e30`` (float32) overflows, and absolute thresholds inside a solver (a ridge, a zero test)
act differently at different scales. So, for a declared ``k``:

- a weighting solves for ``G' = G / 2^e`` with ``2^e`` the power of two nearest above ``max|G|``
  and returns ``2^{ek} W(G')`` (:func:`scale_free`);
- an aggregator forms the Gramian of ``J' = J / 2^e`` (``2^e`` from ``max|J|``) and returns
  ``2^{e(1+2k)} W(J'J'ᵀ)ᵀ J'`` (``W(J'J'ᵀ)ᵀ J`` itself when ``k = 0``; see
  :class:`~jdoptim.aggregation.GramianWeightedAggregator`).

Division by a power of two is exact (barring subnormal results, which carry no relative accuracy
in the first place), so the law holds to the last bit for power-of-two scalings and to rounding
for the others, at every scale the input's dtype can represent.

**Precision.** float16 and bfloat16 inputs are computed in float32 (:data:`LOW_PRECISION`) and the
result is returned in the input's dtype: their 3 (float16) or 2 (bfloat16) significant digits
are the data's accuracy, not a working precision for eigendecompositions or QPs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

#: Dtypes computed in float32 (and returned in their own dtype).
LOW_PRECISION = (torch.float16, torch.bfloat16)

_Forward = TypeVar("_Forward", bound=Callable[..., Tensor])


def working_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for :data:`LOW_PRECISION` dtypes, ``dtype`` itself otherwise."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


#: Up to this many entries, :func:`power_of_two_exponent` reads the values as Python floats (one
#: transfer) instead of running three tensor operations, each slow right after a step's products.
_READ_AS_FLOATS_UP_TO = 256


def power_of_two_exponent(tensor: Tensor) -> int:
    """``e`` with ``2^{e-1} ≤ max|tensor| < 2^e`` (``0`` for an empty or all-zero tensor, or
    one with a non-finite entry)."""
    count = tensor.numel()
    if count == 0:
        return 0
    if count <= _READ_AS_FLOATS_UP_TO:  # (a Gramian of up to 16 losses, in every step)
        values = tensor.detach().reshape(-1).tolist()
        if not all(map(math.isfinite, values)):
            return 0
        top = max(map(abs, values))
    else:
        top = float(tensor.detach().abs().max())
    if not (top > 0.0 and math.isfinite(top)):
        return 0
    return math.frexp(top)[1]


def times_power_of_two(tensor: Tensor, exponent: float) -> Tensor:
    """``tensor · 2^exponent`` for a tensor of a working dtype (float32, float64; see
    :func:`working_dtype`): one factor up to ``2^±100``, beyond that two, so that neither
    over- nor underflows on its own (``2^exponent`` alone may not be representable)."""
    if exponent == 0:
        return tensor
    if abs(exponent) <= 100:  # 2^exponent is a normal number in every floating dtype but float16
        return tensor * 2.0**exponent
    half = int(exponent) // 2 if float(exponent).is_integer() else exponent / 2
    return tensor * 2.0**half * 2.0 ** (exponent - half)


def scale_free(forward: _Forward) -> _Forward:
    """Decorate a :class:`~jdoptim.aggregation.Weighting`'s ``forward(self, gramian)``.

    Low-precision Gramians are computed in float32; when ``self.scale_degree`` is a number ``k``,
    the Gramian is divided by a power of two ``2^e ≥ max|G|`` and the weights multiplied by
    ``2^{ek}`` (see the module docstring). The weights come back in the Gramian's dtype.
    """

    @functools.wraps(forward)
    def wrapper(self: Any, gramian: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        dtype = gramian.dtype
        work = gramian.to(working_dtype(dtype))
        degree = self.scale_degree
        if degree is None:
            return forward(self, work, *args, **kwargs).to(dtype)
        exponent = power_of_two_exponent(work)
        weights = forward(self, times_power_of_two(work, -exponent), *args, **kwargs)
        return times_power_of_two(weights, exponent * degree).to(dtype)

    return wrapper  # type: ignore[return-value]


def normalized_jacobian(matrix: Tensor) -> tuple[Tensor, int]:
    """``(J / 2^e, e)`` with ``2^e`` the power of two nearest above ``max|J|``."""
    exponent = power_of_two_exponent(matrix)
    return times_power_of_two(matrix, -exponent), exponent


#: How far above the rounding noise seen in a spectrum (its most negative eigenvalue) the
#: numerical-rank cut-off sits.
NOISE_MARGIN = 10.0


def rank_cutoff(eigenvalues: Tensor, relative: float) -> Tensor:
    """The eigenvalue below which a Gramian-like (positive semi-definite) matrix is treated as
    singular: ``max(relative · λ_max, 10 · |λ_min|)`` where ``λ_min < 0``.

    A Gramian computed in float32 over ``n`` parameters carries rounding noise that grows with
    ``n`` (measured on rank-3 Gramians: eigenvalues of ``1e-7 λ_max`` at ``n = 5·10⁴``,
    ``6·10⁻⁶ λ_max`` at ``n = 5·10⁵``), which a weighting cannot know; its null directions then
    get eigenvalues of both signs of that size, so the negative ones measure the noise and keep
    the positive ones out of a pseudo-inverse.
    """
    if eigenvalues.numel() == 0:
        return torch.zeros((), dtype=eigenvalues.dtype, device=eigenvalues.device)
    top = eigenvalues.max().clamp(min=0.0)
    noise = (-eigenvalues.min()).clamp(min=0.0)
    return torch.maximum(relative * top, NOISE_MARGIN * noise)
