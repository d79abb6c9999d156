import math

import pytest
import torch

from recurra.layers import build
from recurra.layers.s4d import S4D
from recurra.ops.s4d import (
    discretize,
    hippo_legs,
    init_lambda,
    s4d_fft,
    s4d_kernel,
    s4d_reference,
)
from recurra.testing import check_layer_contract, check_trains_in_language_model

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: extra threads only add synchronisation (very slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_hippo_legs_matrix_and_normal_part():
    A, B, P = hippo_legs(4)
    want = torch.tensor([[-1, 0, 0, 0],
                         [-math.sqrt(3), -2, 0, 0],
                         [-math.sqrt(5), -math.sqrt(15), -3, 0],
                         [-math.sqrt(7), -math.sqrt(21), -math.sqrt(35), -4]], dtype=D)
    torch.testing.assert_close(A, want)
    torch.testing.assert_close(B, torch.sqrt(torch.tensor([1.0, 3, 5, 7], dtype=D)))
    skew = A + P.unsqueeze(1) * P.unsqueeze(0) + 0.5 * torch.eye(4, dtype=D)
    torch.testing.assert_close(skew, -skew.T)


@pytest.mark.parametrize("kind", ["legs", "lin", "inv"])
def test_inits(kind):
    lam, B = init_lambda(kind, 8)
    assert lam.shape == (4,) and B.shape == (4,)
    torch.testing.assert_close(lam.real, torch.full((4,), -0.5, dtype=D))
    n = torch.arange(4, dtype=D)
    if kind == "lin":
        torch.testing.assert_close(lam.imag, math.pi * n)
    elif kind == "inv":
        torch.testing.assert_close(lam.imag, 8 / math.pi * (8 / (2 * n + 1) - 1))
    else:  # each mode and its conjugate are eigenvalues of the normal part of HiPPO-LegS
        A, _, P = hippo_legs(8)
        eig = torch.linalg.eigvals(A + P.unsqueeze(1) * P.unsqueeze(0))
        for value in lam:
            assert (eig - value).abs().min() < 1e-9
            assert (eig - value.conj()).abs().min() < 1e-9


def problem(h=3, n2=4, b=2, t=29, seed=0, method="zoh"):
    g = torch.Generator().manual_seed(seed)
    lam = torch.complex(-torch.rand(h, n2, generator=g, dtype=D) - 0.1,
                        3 * torch.randn(h, n2, generator=g, dtype=D))
    Bc = torch.complex(torch.randn(h, n2, generator=g, dtype=D),
                       torch.randn(h, n2, generator=g, dtype=D))
    dt = torch.rand(h, generator=g, dtype=D) * 0.5 + 0.05
    A_bar, B_bar = discretize(lam, Bc, dt, method)
    C = torch.complex(torch.randn(h, n2, generator=g, dtype=D),
                      torch.randn(h, n2, generator=g, dtype=D))
    Dk = torch.randn(h, generator=g, dtype=D)
    u = torch.randn(b, h, t, generator=g, dtype=D)
    x0 = torch.complex(torch.randn(b, h, n2, generator=g, dtype=D),
                       torch.randn(b, h, n2, generator=g, dtype=D))
    return u, A_bar, B_bar, C, Dk, x0


def test_kernel_is_the_power_loop():
    _, A_bar, B_bar, C, _, _ = problem()
    K = s4d_kernel(A_bar, B_bar, C, 12)
    power = torch.ones_like(A_bar)
    for ell in range(12):
        torch.testing.assert_close(K[:, ell], 2 * (C * power * B_bar).sum(-1).real)
        power = power * A_bar


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_fft_convolution_equals_recurrence_with_gradients(method):
    u, A_bar, B_bar, C, Dk, x0 = problem(method=method)
    # gradients through real leaves (complex leaves are built from them)
    leaves = [a.clone().requires_grad_() for a in
              (u, A_bar.real, A_bar.imag, B_bar.real, C.imag, Dk, x0.real)]

    def run(op):
        uu, ar, ai, br, ci, dk, xr = leaves
        a = torch.complex(ar, ai)
        bb = torch.complex(br, B_bar.imag)
        c = torch.complex(C.real, ci)
        y, x = op(uu, a, bb, c, dk, torch.complex(xr, x0.imag))
        g = torch.Generator().manual_seed(3)
        loss = (y * torch.randn(y.shape, generator=g, dtype=D)).sum() + (
            torch.view_as_real(x) * torch.randn(x.shape + (2,), generator=g, dtype=D)).sum()
        return y.detach(), x.detach(), torch.autograd.grad(loss, leaves)

    y1, x1, g1 = run(s4d_reference)
    y2, x2, g2 = run(lambda *a: s4d_fft(*a, chunk_size=8))
    torch.testing.assert_close(y2, y1, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x2, x1, atol=1e-10, rtol=1e-9)
    for a, c in zip(g2, g1):
        torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-8)


def test_fft_final_state_with_lengths():
    u, A_bar, B_bar, C, Dk, x0 = problem()
    lengths = torch.tensor([29, 11])
    u = u * (torch.arange(29) < lengths.unsqueeze(1)).unsqueeze(1)
    _, x = s4d_fft(u, A_bar, B_bar, C, Dk, x0, lengths=lengths, chunk_size=4)
    _, x_ref = s4d_reference(u[1:, :, :11], A_bar, B_bar, C, Dk, x0[1:])
    torch.testing.assert_close(x[1:], x_ref)


def test_zoh_and_bilinear_agree_as_dt_goes_to_zero():
    lam, B = init_lambda("lin", 8)
    lam, B = lam.unsqueeze(0), B.unsqueeze(0)
    errs = []
    for dt in (1e-1, 1e-2, 1e-3):
        a1, _ = discretize(lam, B, torch.tensor([dt], dtype=D), "zoh")
        a2, _ = discretize(lam, B, torch.tensor([dt], dtype=D), "bilinear")
        errs.append(((a1 - a2).abs().max() / dt).item())
    assert errs[1] < 0.02 * errs[0] and errs[2] < 0.02 * errs[1]  # O(dt^3) per unit dt


@pytest.mark.parametrize("init,method", [("legs", "zoh"), ("lin", "bilinear"), ("inv", "zoh")])
def test_layer_contract(init, method):
    torch.manual_seed(0)
    check_layer_contract(S4D(3, d_state=4, init=init, discretization=method), steps=9)


def test_registered_and_bad_options():
    layer = build("s4d", 8, d_state=16, init="inv")
    y, (x,) = layer(torch.randn(2, 5, 8))
    assert y.shape == (2, 5, 8) and x.shape == (2, 8, 8, 2)
    with pytest.raises(ValueError, match="d_state"):
        S4D(4, d_state=5)
    with pytest.raises(ValueError, match="init"):
        S4D(4, init="foo")
    with pytest.raises(ValueError, match="discretization"):
        S4D(4, discretization="euler")


def test_trains_and_decodes_inside_recurrent_lm():
    check_trains_in_language_model("s4d", {"d_state": 8})


# ------------------------------------------------------------------------------------ LSSL
@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_lssl_discretisation_oracles(method):
    from recurra.ops.lssl import discretize_dense

    A, B, _ = hippo_legs(5)
    dt = torch.tensor([0.05, 0.2], dtype=D)
    A_bar, B_bar = discretize_dense(A, B, dt, method)
    eye = torch.eye(5, dtype=D)
    for i, d in enumerate(dt):
        if method == "bilinear":
            want_a = torch.inverse(eye - d / 2 * A) @ (eye + d / 2 * A)
            want_b = torch.inverse(eye - d / 2 * A) @ (d * B)
        else:
            want_a = torch.matrix_exp(d * A)
            want_b = torch.inverse(A) @ (want_a - eye) @ B
        torch.testing.assert_close(A_bar[i], want_a)
        torch.testing.assert_close(B_bar[i], want_b)


def test_lssl_convolution_equals_recurrence():
    from recurra.ops.lssl import discretize_dense, lssl_conv, lssl_reference

    g = torch.Generator().manual_seed(0)
    A, B, _ = hippo_legs(6)
    A_bar, B_bar = discretize_dense(A, B, torch.tensor([0.1, 0.3, 0.02], dtype=D), "bilinear")
    C = torch.randn(3, 6, generator=g, dtype=D)
    Dk = torch.randn(3, generator=g, dtype=D)
    u = torch.randn(2, 3, 21, generator=g, dtype=D)
    x0 = torch.randn(2, 3, 6, generator=g, dtype=D)
    y1, x1 = lssl_reference(u, A_bar, B_bar, C, Dk, x0)
    y2, x2 = lssl_conv(u, A_bar, B_bar, C, Dk, x0)
    torch.testing.assert_close(y2, y1, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(x2, x1, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("method", ["bilinear", "zoh"])
def test_lssl_layer_contract(method):
    from recurra.layers.lssl import LSSL

    torch.manual_seed(0)
    check_layer_contract(LSSL(2, d_state=3, discretization=method), steps=9)
