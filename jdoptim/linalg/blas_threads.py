"""numpy's BLAS on one thread while a solver works on a large Gramian.

numpy's wheels bundle OpenBLAS with a thread pool of its own, apart from torch's OpenMP pool.
After a training step's matrix products, torch's OpenMP threads keep spinning on the cores for a
while (they wait actively for the next parallel region); an OpenBLAS call that splits its work
over threads then waits for cores that are taken. Measured on a 2-core machine right after a
``512 × 512`` torch product (medians of 40): a ``128 × 128`` numpy product 2.4 ms, against 0.09
ms through torch and 0.11 ms on one OpenBLAS thread; a ``128 × 128`` Cholesky factorisation 1.4
ms, against 0.12 ms. Below ``64 × 64`` OpenBLAS does not split the work and nothing changes.

The solvers' matrices are small (``m`` up to a few hundred), so one thread costs them little
even on an idle machine: from :data:`SERIAL_FROM` losses on, their numpy code runs under
threadpoolctl's limit of one BLAS thread (:func:`serial_numpy_blas`), which costs about 30 µs
and restores the previous setting on exit. torch's own linear algebra is not touched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import cast

from threadpoolctl import ThreadpoolController

#: From this many losses (the Gramian's side) on, the solvers' numpy BLAS runs on one thread.
SERIAL_FROM = 96

_controller: ThreadpoolController | None = None
#: threadpoolctl could not inspect or set the process's thread pools: the limit is skipped
_unavailable = False


def _blas_controller() -> ThreadpoolController | None:
    """The process's thread-pool controller, made on first use (it scans the loaded libraries
    once, which takes a few milliseconds), or ``None`` where threadpoolctl fails here."""
    global _controller, _unavailable
    if _controller is None and not _unavailable:
        try:
            _controller = ThreadpoolController()
        except Exception:  # (a speed measure must never fail a solve)
            _unavailable = True
    return _controller


def _limited(controller: ThreadpoolController) -> contextlib.AbstractContextManager[object]:
    """``controller``'s limit of one BLAS thread, or no limit where setting it fails."""
    global _unavailable
    try:
        return cast(
            contextlib.AbstractContextManager[object],
            controller.limit(limits=1, user_api="blas"),
        )
    except Exception:
        _unavailable = True
        return contextlib.nullcontext()


@contextlib.contextmanager
def serial_numpy_blas(size: int) -> Iterator[None]:
    """numpy's BLAS (OpenBLAS or MKL) limited to one thread inside the block when ``size`` (the
    problem's number of losses) is at least :data:`SERIAL_FROM`; a no-op below it, and where
    threadpoolctl cannot inspect or set the thread pools (the solve runs unlimited)."""
    controller = _blas_controller() if size >= SERIAL_FROM else None
    if controller is None:
        yield
        return
    with _limited(controller):
        yield
