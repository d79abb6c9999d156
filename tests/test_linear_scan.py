"""linear_scan: fast methods held to the plain loop (forward, reverse, blocks, gradients)."""

import pytest
import torch

from recurra.ops.linear_scan import linear_scan, linear_scan_reference

FAST = ["oddeven", "chunked"]
F64 = torch.float64


def _problem(batch, steps, block, dtype, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    if block:
        a = scale * torch.randn(batch, steps, 3, 2, 2, generator=gen, dtype=dtype) / 1.5
        b = torch.randn(batch, steps, 3, 2, generator=gen, dtype=dtype)
    else:
        # coefficients in [-1, 1] with exact zeros and negatives
        a = scale * (2 * torch.rand(batch, steps, 4, generator=gen, dtype=dtype) - 1)
        b = torch.randn(batch, steps, 4, generator=gen, dtype=dtype)
    a[:, ::5] = 0  # includes a_1 = 0 (a reset)
    h0 = torch.randn((batch,) + tuple(b.shape[2:]), generator=gen, dtype=dtype)
    return a, b, h0


def _loop_by_hand(a, b, h0, block):
    """Independent oracle: an explicit index loop (no shared code with the module)."""
    h, out = h0, []
    for t in range(b.shape[1]):
        if block:
            h = torch.einsum("...ij,...j->...i", a[:, t], h) + b[:, t]
        else:
            h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("steps", [1, 7, 1000])
@pytest.mark.parametrize("block", [False, True])
def test_forward_matches_loop_float64(method, steps, block):
    a, b, h0 = _problem(2, steps, block, F64, seed=steps)
    ref = _loop_by_hand(a, b, h0, block)
    torch.testing.assert_close(linear_scan_reference(a, b, h0), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(linear_scan(a, b, h0, method=method), ref, atol=1e-12,
                               rtol=1e-12)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("block", [False, True])
def test_forward_float32_long(method, block):
    a, b, h0 = _problem(2, 16384 if not block else 4096, block, torch.float32, seed=1)
    ref = _loop_by_hand(a.double(), b.double(), h0.double(), block)
    out = linear_scan(a, b, h0, method=method)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("block", [False, True])
def test_reverse_is_the_flipped_scan(method, block):
    a, b, h0 = _problem(3, 33, block, F64, seed=2)
    ref = _loop_by_hand(a.flip(1), b.flip(1), h0, block).flip(1)
    torch.testing.assert_close(linear_scan(a, b, h0, reverse=True, method=method), ref,
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(linear_scan_reference(a, b, h0, reverse=True), ref,
                               atol=1e-12, rtol=1e-12)


def test_default_initial_state_is_zero():
    a, b, _ = _problem(2, 9, False, F64, seed=3)
    torch.testing.assert_close(linear_scan(a, b), _loop_by_hand(a, b, torch.zeros(2, 4, dtype=F64),
                                                                False))


def test_dense_recurrence_as_one_block():
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 50, 6, 6, generator=gen, dtype=F64) / 3
    b = torch.randn(2, 50, 6, generator=gen, dtype=F64)
    h0 = torch.randn(2, 6, generator=gen, dtype=F64)
    for method in FAST:
        torch.testing.assert_close(linear_scan(a, b, h0, method=method),
                                   _loop_by_hand(a, b, h0, True), atol=1e-12, rtol=1e-12)


def _grads(fn, a, b, h0, g):
    a, b, h0 = (t.detach().requires_grad_(True) for t in (a, b, h0))
    out = fn(a, b, h0)
    return torch.autograd.grad((out * g).sum(), (a, b, h0))


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("block", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gradients_match_autograd_through_loop(method, block, reverse, dtype, tol):
    a, b, h0 = _problem(2, 300, block, dtype, seed=5, scale=0.95)
    g = torch.randn(b.shape, generator=torch.Generator().manual_seed(6), dtype=dtype)
    ref = _grads(lambda a, b, h0: linear_scan_reference(a, b, h0, reverse=reverse), a, b, h0, g)
    got = _grads(lambda a, b, h0: linear_scan(a, b, h0, reverse=reverse, method=method),
                 a, b, h0, g)
    for name, x, y in zip(["a", "b", "initial_state"], got, ref):
        torch.testing.assert_close(x, y, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("method", FAST)
@pytest.mark.parametrize("block", [False, True])
def test_gradcheck(method, block):
    a, b, h0 = _problem(2, 11, block, F64, seed=7)
    args = tuple(t.requires_grad_(True) for t in (a, b, h0))
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, method=method), args)
    assert torch.autograd.gradcheck(
        lambda a, b, h0: linear_scan(a, b, h0, reverse=True, method=method), args)


@pytest.mark.parametrize("bad,name", [
    (dict(a=torch.zeros(2, 5, 3)), "a must have shape"),
    (dict(a=torch.zeros(2, 5, 4, 3, 3)), "a must have shape"),
    (dict(a=torch.zeros(2, 5, 4, dtype=F64)), "a must have the dtype"),
    (dict(b=torch.zeros(5)), "b must have shape"),
    (dict(b=torch.zeros(2, 5, 4, dtype=torch.long), a=torch.zeros(2, 5, 4, dtype=torch.long)),
     "b must be a floating-point"),
    (dict(initial_state=torch.zeros(2, 5)), "initial_state must have shape"),
    (dict(initial_state=torch.zeros(2, 4, dtype=F64)), "initial_state must have dtype"),
    (dict(reverse=1), "reverse must be a bool"),
    (dict(method="magic"), "method must be one of"),
])
def test_bad_input_raises_value_error_naming_argument(bad, name):
    kwargs = dict(a=torch.zeros(2, 5, 4), b=torch.zeros(2, 5, 4), initial_state=None)
    kwargs.update(bad)
    with pytest.raises(ValueError, match=name):
        linear_scan(**kwargs)


def test_empty_time_axis():
    b = torch.zeros(2, 0, 3)
    assert linear_scan(torch.zeros(2, 0, 3), b).shape == (2, 0, 3)
