import pytest
import torch

from recurra.layers.fsmn import FSMNLayer
from recurra.layers.registry import available, build
from recurra.ops.fsmn import fsmn_memory, fsmn_memory_reference, fsmn_memory_step
from recurra.testing import check_layer_contract, check_learns_lag_two_recall

D64 = torch.float64


def _taps(n1, n2, d, gen):
    return (torch.randn(n1 + 1, d, generator=gen, dtype=D64),
            torch.randn(n2, d, generator=gen, dtype=D64))


@pytest.mark.parametrize("n1,s1,n2,s2", [(0, 1, 0, 1), (3, 1, 0, 1), (2, 3, 0, 1), (3, 2, 2, 3),
                                          (0, 1, 4, 1), (1, 1, 6, 2)])
def test_conv_form_equals_tap_loop(n1, s1, n2, s2):
    gen = torch.Generator().manual_seed(n1 * 10 + n2)
    p = torch.randn(2, 11, 3, generator=gen, dtype=D64)
    a, c = _taps(n1, n2, 3, gen)
    hist = torch.randn(2, n1 * s1, 3, generator=gen, dtype=D64)
    for h in (None, hist):
        ref = fsmn_memory_reference(p, a, c, s1, s2, history=h)
        fast = fsmn_memory(p, a, c, s1, s2, history=h)
        torch.testing.assert_close(fast, ref, atol=1e-12, rtol=1e-12)


def test_impulse_response_is_the_taps():
    gen = torch.Generator().manual_seed(1)
    n1, s1, n2, s2, T = 3, 2, 2, 3, 21
    a, c = _taps(n1, n2, 2, gen)
    p = torch.zeros(1, T, 2, dtype=D64)
    p[0, 10] = 1.0
    m = fsmn_memory(p, a, c, s1, s2)[0]
    expect = torch.zeros(T, 2, dtype=D64)
    for i in range(n1 + 1):
        expect[10 + s1 * i] += a[i]
    for j in range(1, n2 + 1):
        expect[10 - s2 * j] += c[j - 1]
    torch.testing.assert_close(m, expect, atol=0, rtol=0)


def test_shift_register_step_is_the_conv_delayed():
    gen = torch.Generator().manual_seed(2)
    n1, s1, n2, s2, T = 2, 2, 3, 2, 17
    a, c = _taps(n1, n2, 4, gen)
    p = torch.randn(3, T, 4, generator=gen, dtype=D64)
    full = fsmn_memory(p, a, c, s1, s2)
    delay = n2 * s2
    buf = torch.zeros(3, n1 * s1 + delay, 4, dtype=D64)
    outs = []
    for t in range(T + delay):
        p_t = p[:, t] if t < T else torch.zeros(3, 4, dtype=D64)
        m, buf = fsmn_memory_step(p_t, buf, a, c, s1, s2)
        outs.append(m)
    torch.testing.assert_close(torch.stack(outs[delay:], 1), full, atol=1e-12, rtol=1e-12)


def test_causal_memory_ignores_the_future():
    gen = torch.Generator().manual_seed(3)
    a, c = _taps(3, 0, 2, gen)
    p = torch.randn(1, 12, 2, generator=gen, dtype=D64, requires_grad=True)
    m = fsmn_memory(p, a, c, 2, 1)
    m[0, 5].sum().backward()
    assert p.grad[0, 6:].abs().max() == 0
    assert p.grad[0, [5, 3, 1]].abs().min() > 0


CAUSAL_CONFIGS = [
    dict(lookback_order=3, lookback_stride=1),
    dict(lookback_order=2, lookback_stride=2, skip=False),
    dict(lookback_order=0),
    dict(lookback_order=1, gated=True, dilation_levels=2),
]


@pytest.mark.parametrize("options", CAUSAL_CONFIGS)
def test_causal_fsmn_contract(options):
    torch.manual_seed(0)
    layer = FSMNLayer(3, hidden_size=4, **options)
    assert layer.causal and layer.delay == 0
    check_layer_contract(layer, steps=8)


LOOKAHEAD_CONFIGS = [
    dict(lookback_order=2, lookahead_order=2, lookahead_stride=2),
    dict(lookback_order=1, lookback_stride=2, lookahead_order=1, gated=True, dilation_levels=2),
]


@pytest.mark.parametrize("options", LOOKAHEAD_CONFIGS)
def test_lookahead_fsmn_contract(options):
    torch.manual_seed(0)
    layer = FSMNLayer(3, hidden_size=4, **options)
    assert not layer.causal
    with pytest.raises(ValueError, match="not causal"):
        layer.step(torch.randn(2, 3))
    check_layer_contract(layer, steps=8)  # padding + gradcheck (step and chunks do not apply)


@pytest.mark.parametrize("options", LOOKAHEAD_CONFIGS + CAUSAL_CONFIGS[:1] + CAUSAL_CONFIGS[3:])
def test_delayed_stream_equals_parallel(options):
    torch.manual_seed(1)
    layer = FSMNLayer(4, hidden_size=6, **options).double()
    x = torch.randn(2, 13, 4, dtype=D64)
    y_ref, _ = layer(x)
    state, outs = None, []
    for t in range(13):
        y_t, state = layer.stream_step(x[:, t], state)
        outs.append(y_t)
    ys = torch.stack(outs, 1)
    d = layer.delay
    assert d == sum(options.get("lookahead_order", 0) * options.get("lookahead_stride", 1) * 2 ** l
                    for l in range(options.get("dilation_levels", 1)))
    assert (ys[:, :d] == 0).all()
    full = torch.cat([ys[:, d:], layer.stream_flush(state)], 1)
    torch.testing.assert_close(full, y_ref, atol=1e-12, rtol=1e-12)
    # memory of the stream does not grow with time
    sizes = [s.numel() for s in state]
    for t in range(20):
        _, state = layer.stream_step(x[:, t % 13], state)
    assert [s.numel() for s in state] == sizes
    if layer.causal:  # the stream of a causal layer is its step
        st = None
        for t in range(13):
            y_t, st = layer.step(x[:, t], st)
            torch.testing.assert_close(y_t, outs[t], atol=1e-12, rtol=1e-12)


def test_dfsmn_block_matches_hand_formula():
    torch.manual_seed(2)
    layer = FSMNLayer(3, hidden_size=5, lookback_order=2, lookahead_order=1).double()
    x = torch.randn(1, 8, 3, dtype=D64)
    p = layer.down(torch.relu(layer.up(x)))
    a, c = layer.lookback[0], layer.lookahead[0]
    expect = torch.zeros_like(x)
    for t in range(8):
        expect[:, t] = x[:, t] + p[:, t]
        for i in range(3):
            if t - i >= 0:
                expect[:, t] += a[i] * p[:, t - i]
        if t + 1 < 8:
            expect[:, t] += c[0] * p[:, t + 1]
    y, _ = layer(x)
    torch.testing.assert_close(y, expect, atol=1e-12, rtol=1e-12)


def test_registered_and_bad_options():
    assert "fsmn" in available()
    with pytest.raises(ValueError, match="lookback_order"):
        build("fsmn", 4, lookback_order=-1)
    with pytest.raises(ValueError, match="lookahead_stride"):
        build("fsmn", 4, lookahead_stride=0)
    layer = build("fsmn", 4)
    with pytest.raises(ValueError, match="x_t"):
        layer.stream_step(torch.randn(2, 3))


def test_trains_inside_recurrent_lm():
    check_learns_lag_two_recall("fsmn", dict(lookback_order=3))
