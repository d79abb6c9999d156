"""The compiled inference kernels (recurra.ops.chunked_scan_compiled) against the reference loops,
and the layers' inference path (backend="auto" without gradients) against their torch path and
their step loops."""

import pytest
import torch
import torch.nn.functional as F

from recurra.layers import build
from recurra.ops import chunked_scan_compiled as compiled
from recurra.ops.linear_attention import feature_map, linear_attention_reference
from recurra.ops.ssd import ssd_reference

pytestmark = pytest.mark.skipif(not compiled.EXTENSION.available(),
                                reason="the C++ inference kernels cannot be built here")

TOL = {torch.float64: {"atol": 1e-11, "rtol": 1e-9}, torch.float32: {"atol": 2e-4, "rtol": 1e-4}}


def _strided(t: torch.Tensor, gen) -> torch.Tensor:
    """The same values as a non-contiguous view (rows padded with junk, unit last stride)."""
    wide = torch.randn(*t.shape[:-1], t.shape[-1] + 3, generator=gen, dtype=t.dtype)
    wide[..., 1:1 + t.shape[-1]] = t
    return wide[..., 1:1 + t.shape[-1]]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("b,T,H,P,G,N,chunk", [
    (2, 37, 4, 5, 2, 3, 8),       # groups, a partial last chunk
    (1, 64, 2, 64, 1, 64, 64),    # one full chunk, register-block widths
    (2, 150, 3, 70, 3, 65, 64),   # widths past one register block, three chunks
    (1, 5, 1, 3, 1, 2, 64),       # shorter than a chunk
])
def test_ssd_forward_equals_reference_loop(dtype, b, T, H, P, G, N, chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, T, H, P, generator=gen, dtype=dtype)
    log_a = -torch.rand(b, T, H, generator=gen, dtype=dtype) * 2
    B = torch.randn(b, T, G, N, generator=gen, dtype=dtype)
    C = torch.randn(b, T, G, N, generator=gen, dtype=dtype)
    h0 = torch.randn(b, H, P, N, generator=gen, dtype=dtype)
    scale = torch.rand(b, T, H, generator=gen, dtype=dtype)
    D = torch.randn(H, generator=gen, dtype=dtype)
    y_ref, h_ref = ssd_reference(x * scale[..., None], log_a, B, C, h0)
    y_ref = y_ref + D[:, None] * x
    y, h = compiled.ssd_forward(_strided(x, gen), log_a, _strided(B, gen), _strided(C, gen), h0,
                                chunk, x_scale=scale, D=D)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])
    # without the options: the plain SSD
    y, h = compiled.ssd_forward(x, log_a, B, C, None, chunk)
    y_ref, h_ref = ssd_reference(x, log_a, B, C)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(h, h_ref, **TOL[dtype])


def test_ssd_forward_stays_finite_under_strong_decay():
    """exp(cum_i - cum_j), never exp(cum_i) exp(-cum_j): no overflow when the decay is huge."""
    gen = torch.Generator().manual_seed(1)
    b, T, H, P, N = 1, 128, 2, 4, 3
    x = torch.randn(b, T, H, P, generator=gen)
    log_a = torch.full((b, T, H), -30.0)
    B, C = (torch.randn(b, T, 1, N, generator=gen) for _ in range(2))
    y, _ = compiled.ssd_forward(x, log_a, B, C, None, 64)
    y_ref, _ = ssd_reference(x.double(), log_a.double(), B.double(), C.double())
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("elu", [True, False])
def test_linear_attention_forward_equals_reference_loop(dtype, normalize, elu):
    gen = torch.Generator().manual_seed(2)
    b, H, T, F_, Dv = 2, 3, 77, 6, 5
    q, k = (torch.randn(b, H, T, F_, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(b, H, T, Dv, generator=gen, dtype=dtype)
    state = (torch.rand(b, H, F_, Dv, generator=gen, dtype=dtype),)
    if normalize:
        state += (torch.rand(b, H, F_, generator=gen, dtype=dtype) + 1,)
    kind = "elu" if elu else "identity"
    if not elu and normalize:  # positive keys and queries keep the normaliser away from 0
        q, k = q.abs(), k.abs()
    y_ref, s_ref = linear_attention_reference(feature_map(q, kind), feature_map(k, kind), v,
                                              state, normalize, 1e-6)
    # head-first views of a time-major projection, as the layer passes them
    tm = torch.cat([q, k, v], -1).transpose(1, 2).contiguous().transpose(1, 2)
    qv, kv, vv = tm.split([F_, F_, Dv], -1)
    y, s = compiled.linear_attention_forward(qv, kv, vv, state, normalize, 1e-6, 16, elu)
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    assert len(s) == len(s_ref)
    for a, r in zip(s, s_ref):
        torch.testing.assert_close(a, r, **TOL[dtype])


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_causal_conv_silu_equals_torch_ops(k, with_lengths):
    gen = torch.Generator().manual_seed(3)
    layer = build("mamba2", 16, d_state=4, head_dim=4, conv_kernel=k).double()
    u = _strided(torch.randn(3, 11, layer.conv_dim, generator=gen, dtype=torch.float64), gen)
    state = torch.randn(3, k - 1, layer.conv_dim, generator=gen, dtype=torch.float64)
    lengths = torch.tensor([11, 0, 2]) if with_lengths else None
    out_ref, state_ref = layer._conv(u, state, lengths)
    out, new_state = compiled.causal_conv_silu(u, state, layer.conv_weight.detach(),
                                               layer.conv_bias.detach(), lengths)
    torch.testing.assert_close(out, F.silu(out_ref))
    torch.testing.assert_close(new_state, state_ref)


def test_gated_rms_norm_equals_torch_ops():
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(2, 7, 40, generator=gen, dtype=torch.float64)
    z = _strided(torch.randn(2, 7, 40, generator=gen, dtype=torch.float64), gen)
    w = torch.randn(40, generator=gen, dtype=torch.float64)
    ref = F.rms_norm(y * F.silu(z), (40,), w, 1e-5)
    torch.testing.assert_close(compiled.gated_rms_norm(y, z, w, 1e-5), ref)


LAYERS = [
    ("mamba2", {"d_state": 8, "head_dim": 4, "chunk_size": 8}),
    ("mamba2", {"d_state": 8, "head_dim": 4, "chunk_size": 8, "n_groups": 2, "conv_kernel": 3,
                "decay_scale": 2.0, "insert_scale": 0.5}),
    ("linear_attention", {"heads": 2}),
    ("linear_attention", {"heads": 2, "feature_map": "identity"}),
    ("linear_attention", {"heads": 2, "normalize": False}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,options", LAYERS)
def test_layer_inference_path_equals_torch_path_and_step_loop(dtype, name, options):
    torch.manual_seed(0)
    layer = build(name, 16, **options).to(dtype)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 29, 16, generator=gen, dtype=dtype)
    state = tuple(torch.rand(s, generator=gen, dtype=dtype) for s in layer.state_shapes(3))
    lengths = torch.tensor([29, 10, 1])
    tol = TOL[dtype]
    with torch.no_grad():
        for lens in (None, lengths):
            layer.backend = "torch"
            y_t, s_t = layer(x, state, lengths=lens)
            layer.backend = "auto"
            y_a, s_a = layer(x, state, lengths=lens)
            torch.testing.assert_close(y_a, y_t, **tol)
            for a, t in zip(s_a, s_t):
                torch.testing.assert_close(a, t, **tol)
        # against the step loop (the recurrence itself), and in two calls with the state carried
        s = state
        ys = []
        for t in range(x.shape[1]):
            y_t, s = layer.step(x[:, t], s)
            ys.append(y_t)
        y_a, s_a = layer(x, state)
        torch.testing.assert_close(y_a, torch.stack(ys, 1), **tol)
        y1, s1 = layer(x[:, :13], state)
        y2, s2 = layer(x[:, 13:], s1)
        torch.testing.assert_close(torch.cat([y1, y2], 1), y_a, **tol)
        for a, t in zip(s2, s_a):
            torch.testing.assert_close(a, t, **tol)


@pytest.mark.parametrize("name,options", LAYERS[:1] + LAYERS[2:3])
def test_inference_path_runs_only_without_gradients(monkeypatch, name, options):
    """A spy on the kernel: no_grad calls use it, training calls run the torch ops (the kernel
    has no backward), backend="torch" never uses it."""
    calls = []
    for op in ("ssd_forward", "linear_attention_forward"):  # the layers' entry points
        real = getattr(compiled, op)
        monkeypatch.setattr(compiled, op,
                            lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    layer = build(name, 16, **options)
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        layer(x)
    assert calls, "no_grad call did not use the compiled kernel"
    calls.clear()
    layer(x)[0].sum().backward()
    assert not calls, "a call needing gradients used the forward-only kernel"
    layer = build(name, 16, backend="torch", **options)
    with torch.no_grad():
        layer(x)
    assert not calls


def test_unavailable_kernels_warn_once_and_run_the_torch_ops(monkeypatch):
    monkeypatch.setattr(compiled.EXTENSION, "module", None)
    monkeypatch.setattr(compiled.EXTENSION, "error", "no compiler (test)")
    monkeypatch.setattr(compiled, "_warned", False)
    layer = build("linear_attention", 16, heads=2)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        with pytest.warns(compiled.CompiledScanWarning, match="no compiler"):
            y = layer(x)[0]
        layer.backend = "torch"
        torch.testing.assert_close(y, layer(x)[0])


def test_bad_backend_raises():
    for name in ("mamba2", "linear_attention"):
        with pytest.raises(ValueError, match="backend must be one of"):
            build(name, 16, backend="cuda")


def test_jrt_decoder_with_elu_takes_the_inference_path_with_the_same_numbers(monkeypatch):
    """PrefixLinearAttention runs its causal part through LinearAttention's forward."""
    calls = []
    real = compiled.linear_attention_forward
    monkeypatch.setattr(compiled, "linear_attention_forward",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(3)
    layer = build("jrt", 16, heads=2, feature_map="elu", prefix_length=5).double()
    x = torch.randn(2, 19, 16, dtype=torch.float64)
    with torch.no_grad():
        layer.backend = "torch"
        y_t, s_t = layer(x)
        assert not calls
        layer.backend = "auto"
        y_a, s_a = layer(x)
        assert calls, "the inference path was not taken"
    torch.testing.assert_close(y_a, y_t, **TOL[torch.float64])
    for a, t in zip(s_a, s_t):
        torch.testing.assert_close(a, t, **TOL[torch.float64])
