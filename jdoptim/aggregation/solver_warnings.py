"""The once-per-instance warning of a method whose quadratic program needed more than the fast
path (a large ridge, clipped eigenvalues, quadprog fallbacks: :class:`~jdoptim.linalg.
equilibration.DualConeInfo`).

A training loop calls a method thousands of times on similar Gramians; a warning on every step
would bury the first one, so each instance warns once.
"""

from __future__ import annotations

import warnings

from ..linalg.equilibration import DualConeInfo
from ..linalg.user_frame import user_stacklevel

__all__ = ["warn_once_if_degraded"]


def warn_once_if_degraded(owner: object, info: DualConeInfo, method: str) -> None:
    """Warn once per ``owner`` instance (not on every step) when ``info`` shows a degraded solve."""
    if not info.degraded or getattr(owner, "_warned_ill_conditioned", False):
        return
    object.__setattr__(owner, "_warned_ill_conditioned", True)
    warnings.warn(
        f"{method}: ill-conditioned Gramian; the dual-cone QP needed {info.describe()}. The "
        "weights are still those of a certified solve of the regularised problem. This warning "
        "is shown once per instance.",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )
