"""Gradients stored in ``.grad`` without a copy only where that is safe (jdoptim/grads.py), and the
finiteness check of many gradients (jdoptim/finite.py): each case against an independent
computation (``backward()``'s own gradients, hand-built tensors)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jdoptim.linalg.finite as finite_module
from jdoptim import JDOptimizer
from jdoptim.finite import all_finite
from jdoptim.grads import store_gradients
from jdoptim.scalarization import Constant, Sum


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def test_a_same_size_view_is_stored_as_it_is():
    """A Linear layer's weight gradient from autograd.grad is a transposed view of a tensor of
    its own size: stored without a copy, as backward() would, with the right values."""
    torch.manual_seed(0)
    layer, x = nn.Linear(4, 3), torch.randn(5, 4)
    grads = torch.autograd.grad(layer(x).pow(2).sum(), list(layer.parameters()))
    assert grads[0]._base is not None  # the case this is about
    store_gradients(list(zip(layer.parameters(), grads)))
    expected = nn.Linear(4, 3)
    expected.load_state_dict(layer.state_dict())
    expected(x).pow(2).sum().backward()
    for param, grad, reference in zip(layer.parameters(), grads, expected.parameters()):
        assert param.grad is not None and _shares(param.grad, grad)
        torch.testing.assert_close(param.grad, reference.grad)


def test_a_row_of_a_block_an_expanded_tensor_and_a_non_contiguous_one_are_copied():
    block = torch.arange(12.0).reshape(3, 4)
    p, q, r = (nn.Parameter(torch.zeros(4)) for _ in range(3))
    s = nn.Parameter(torch.zeros(4, 3))
    expanded = torch.tensor(2.0).expand(4)
    store_gradients([(p, block[1]), (q, expanded), (r, block[:, 0].repeat(2)[:4]), (s, block.T)])
    assert p.grad is not None and not _shares(p.grad, block)
    assert p.grad.untyped_storage().nbytes() == 4 * 4  # only its own row is kept alive
    torch.testing.assert_close(p.grad, torch.tensor([4.0, 5.0, 6.0, 7.0]))
    assert q.grad is not None and q.grad.is_contiguous() and q.grad.stride() == (1,)
    q.grad.add_(1.0)  # an in-place update of an expanded tensor would fail
    torch.testing.assert_close(q.grad, torch.full((4,), 3.0))
    assert s.grad is not None and s.grad.is_contiguous() and not _shares(s.grad, block)
    torch.testing.assert_close(s.grad, block.T)


def test_one_tensor_for_two_parameters_and_a_reserved_tensor_are_copied():
    """autograd returns the same tensor for both inputs of an addition: the two .grad must not
    share memory, nor may a .grad share the memory of a reserved tensor (the step's weights)."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(3))
    g_p, g_q = torch.autograd.grad((p + q).pow(2).sum(), [p, q])
    assert _shares(g_p, g_q)
    weights = torch.tensor([1.0, 2.0])
    r = nn.Parameter(torch.zeros(2))
    store_gradients([(p, g_p), (q, g_q), (r, weights)], reserved=(weights,))
    assert p.grad is not None and q.grad is not None and r.grad is not None
    assert not _shares(p.grad, q.grad) and not _shares(r.grad, weights)
    p.grad.zero_()
    r.grad.zero_()
    torch.testing.assert_close(q.grad, torch.full((3,), 4.0))
    torch.testing.assert_close(weights, torch.tensor([1.0, 2.0]))


def test_existing_grads_accumulate_and_dtypes_are_cast():
    p = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    p.grad = torch.ones(2, dtype=torch.float64)
    q = nn.Parameter(torch.zeros(2, dtype=torch.float64))
    store_gradients([(p, torch.tensor([1.0, 2.0])), (q, torch.tensor([3.0, 4.0]))])
    torch.testing.assert_close(p.grad, torch.tensor([2.0, 3.0], dtype=torch.float64))
    assert q.grad is not None and q.grad.dtype == torch.float64
    torch.testing.assert_close(q.grad, torch.tensor([3.0, 4.0], dtype=torch.float64))


def test_scalarized_step_keeps_its_record_weights_out_of_grad():
    """Losses that are a clone of the parameter: the backward's output gradient (the effective
    weights, kept in the record) reaches the parameter unchanged; zeroing .grad in place must
    not zero the record's weights."""
    p = nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = JDOptimizer(torch.optim.SGD([p], lr=0.5), Constant(torch.tensor([1.0, 3.0])))
    record = opt.step(p.clone())
    assert record.weights is not None and p.grad is not None
    torch.testing.assert_close(p.detach(), torch.tensor([0.5, 0.5]))  # p - 0.5 * (1, 3)
    opt.zero_grad(set_to_none=False)
    torch.testing.assert_close(record.weights, torch.tensor([1.0, 3.0]))


def test_shared_memory_grads_from_a_scalarized_step_stay_independent():
    """Two parameters added together get the same gradient tensor from autograd: after the
    step, updating one .grad in place leaves the other."""
    p, q = nn.Parameter(torch.ones(3)), nn.Parameter(torch.full((3,), 2.0))
    opt = JDOptimizer(torch.optim.SGD([p, q], lr=0.0), Sum())
    opt.step([(p + q).pow(2).sum()])
    assert p.grad is not None and q.grad is not None
    p.grad.zero_()
    torch.testing.assert_close(q.grad, torch.full((3,), 6.0))  # 2 (p + q)


def test_all_finite_with_norms_that_overflow():
    """The 2-norm of huge finite entries overflows: the entry-wise check then decides."""
    nan, inf = float("nan"), float("inf")
    huge = torch.full((4,), 3e38)
    assert all_finite([huge, torch.ones(2)])
    assert not all_finite([huge, torch.tensor([1.0, nan])])
    assert not all_finite([huge, torch.tensor([inf])])
    assert all_finite([huge.double(), torch.ones(2)])  # mixed dtypes: the per-tensor path
    assert not all_finite([huge.double(), torch.tensor([-inf])])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_all_finite_on_large_tensors_which_cpu_sums(dtype) -> None:
    """Tensors above ``_OWN_SUM_ABOVE`` entries are summed on CPU: a NaN, a lone ``±inf`` and an
    ``inf`` cancelling a ``-inf`` are found; a sum that overflows on finite entries is not taken
    for a non-finite entry; small tensors beside them are still checked."""
    n = finite_module._OWN_SUM_ABOVE + 1
    ones, small = torch.ones(n, dtype=dtype), torch.ones(3, dtype=dtype)
    assert all_finite([ones, small, ones.reshape(1, n)])
    top = torch.finfo(dtype).max
    assert all_finite([torch.full((n,), top, dtype=dtype), small])  # the sum overflows
    for bad in (float("nan"), float("inf"), -float("inf")):
        broken = ones.clone()
        broken[n // 2] = bad
        assert not all_finite([broken, small])
        assert not all_finite([ones, small, torch.tensor([1.0, bad], dtype=dtype)])
    cancelling = ones.clone()
    cancelling[:2] = torch.tensor([float("inf"), -float("inf")])
    assert not all_finite([cancelling])


def test_all_finite_on_large_complex_tensors() -> None:
    """Complex gradients (normed, as their sum is complex) beside real ones."""
    n = finite_module._OWN_SUM_ABOVE + 1
    z = torch.ones(n, dtype=torch.complex64)
    assert all_finite([torch.ones(n), z])
    z[3] = complex(0.0, float("inf"))
    assert not all_finite([torch.ones(n), z])


def test_a_view_stored_after_its_base_does_not_share_memory() -> None:
    """A contiguous gradient stored by identity, then a view of it for another parameter: the
    view is copied (its storage is the first gradient's), so the two ``.grad`` stay apart."""
    first, second = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    grad = torch.ones(2, 2)
    store_gradients([(first, grad), (second, grad.t())])
    assert first.grad is grad
    assert second.grad.untyped_storage().data_ptr() != grad.untyped_storage().data_ptr()
    first.grad.add_(1.0)
    assert torch.equal(second.grad, torch.ones(2, 2))


def test_a_base_stored_after_its_view_does_not_share_memory() -> None:
    """The other order: a view that owns its whole storage is stored first, then its base for
    another parameter, which must be copied."""
    first, second = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2, 2))
    base = torch.ones(2, 2)
    store_gradients([(first, base.t().contiguous().t()), (second, base)])
    view_holder = torch.nn.Parameter(torch.zeros(4))
    other = torch.nn.Parameter(torch.zeros(4))
    flat = torch.ones(4)
    store_gradients([(view_holder, flat.view(4)), (other, flat)])
    assert view_holder.grad.untyped_storage().data_ptr() != other.grad.untyped_storage().data_ptr()
    view_holder.grad.add_(1.0)
    assert torch.equal(other.grad, torch.ones(4))
