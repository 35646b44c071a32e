"""Where a library warning should point: the first frame of the caller's own code.

A method's warning is raised several calls deep, and how deep depends on the route (a method
called directly, through ``nn.Module.__call__``, through :class:`jdoptim.JDOptimizer`'s step,
through ``torch.optim``'s step wrappers, through a distributed update). A fixed ``stacklevel``
is right for one route only; :func:`user_stacklevel` counts the frames instead, past every frame
of this package and of torch, so the warning names the user's line on every route.
"""

from __future__ import annotations

import os
import sys

__all__ = ["user_stacklevel"]

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH_DIR = os.path.join(os.sep + "torch", "")


def _is_library(filename: str) -> bool:
    path = os.path.abspath(filename)
    return path.startswith(_PACKAGE_DIR) or _TORCH_DIR in path


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the function that calls this one, such
    that the warning points at the first frame outside jdoptim and torch (1 if none is)."""
    frame, level = sys._getframe(1), 1
    while _is_library(frame.f_code.co_filename):
        if frame.f_back is None:
            return 1
        frame, level = frame.f_back, level + 1
    return level
