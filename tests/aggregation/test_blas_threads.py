"""numpy's BLAS on one thread inside the solvers on large Gramians (:mod:`.blas_threads`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import jdoptim.aggregation.mgda as mgda
import jdoptim.linalg.dual_cone as dual_cone
from jdoptim.aggregation import DualProjWeighting, MGDAWeighting
from jdoptim.linalg.blas_threads import SERIAL_FROM, serial_numpy_blas


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


@pytest.fixture
def two_blas_threads():
    """The BLAS pools set to two threads (a single-threaded build stays at one), as the
    pools' thread counts."""
    with threadpool_limits(limits=2, user_api="blas"):
        before = _blas_threads()
        if 2 not in before:
            pytest.skip("no BLAS pool here that threadpoolctl can set to two threads")
        yield before


def test_one_thread_inside_from_serial_from_and_restored_after(two_blas_threads):
    with serial_numpy_blas(SERIAL_FROM):
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == two_blas_threads


def test_unchanged_below_serial_from(two_blas_threads):
    with serial_numpy_blas(SERIAL_FROM - 1):
        assert _blas_threads() == two_blas_threads


def test_restored_when_the_block_raises(two_blas_threads):
    with pytest.raises(RuntimeError), serial_numpy_blas(SERIAL_FROM):
        raise RuntimeError("inside")
    assert _blas_threads() == two_blas_threads


def _gramian(m: int) -> torch.Tensor:
    jacobian = torch.randn(
        m, 3 * m, generator=torch.Generator().manual_seed(m), dtype=torch.float64
    )
    return jacobian @ jacobian.T


@pytest.mark.parametrize("m", [SERIAL_FROM - 1, SERIAL_FROM])
def test_dualproj_and_mgda_solve_on_one_blas_thread_from_serial_from(
    two_blas_threads, monkeypatch, m
):
    """The pivoting solves of DualProj and MGDA (numpy at every size; UPGrad's from
    ``SERIAL_FROM`` losses on are torch's) run on the threads the size calls for, seen from
    inside them, and give the same weights as on two threads."""
    seen: dict[str, list[list[int]]] = {"dual_cone": [], "mgda": []}
    for module, name, key in (
        (dual_cone, "_certified_lcp", "dual_cone"),
        (mgda, "solve_nonnegative_lcp", "mgda"),
    ):
        solve = getattr(module, name)

        def spied(*args, _solve=solve, _key=key, **kwargs):
            seen[_key].append(_blas_threads())
            return _solve(*args, **kwargs)

        monkeypatch.setattr(module, name, spied)
    gramian = _gramian(m)
    dualproj = DualProjWeighting()(gramian)
    mgda_weights = MGDAWeighting()(gramian)
    expected = [1] * len(two_blas_threads) if m >= SERIAL_FROM else two_blas_threads
    for threads in seen.values():
        assert threads and all(t == expected for t in threads)
    monkeypatch.undo()
    with threadpool_limits(limits=2, user_api="blas"):
        np.testing.assert_allclose(DualProjWeighting()(gramian), dualproj, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(MGDAWeighting()(gramian), mgda_weights, rtol=1e-9, atol=1e-12)


def test_solves_unlimited_where_threadpoolctl_fails(monkeypatch):
    """A controller that cannot be made (an unusual platform) leaves the solve as it was."""
    import jdoptim.linalg.blas_threads as blas_threads

    def broken() -> None:
        raise RuntimeError("no thread pools here")

    monkeypatch.setattr(blas_threads, "_controller", None)
    monkeypatch.setattr(blas_threads, "_unavailable", False)
    monkeypatch.setattr(blas_threads, "ThreadpoolController", broken)
    gramian = _gramian(SERIAL_FROM)
    weights = MGDAWeighting()(gramian)
    assert blas_threads._unavailable
    monkeypatch.undo()
    np.testing.assert_allclose(MGDAWeighting()(gramian), weights, rtol=1e-9, atol=1e-12)
