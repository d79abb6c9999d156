"""lstm, gru, elman, slstm: the layer contract, torch.nn parity, heads, backends, errors."""

import pytest
import torch
from torch import nn

import recurra.layers as L
from recurra.ops.recurrent_cells import recurrence_reference
from recurra.ops.recurrent_fused import recurrence
from recurra.testing import check_layer_contract, random_state


def slstm_state(layer, batch, gen):
    """sLSTM states with a positive normaliser n (as every reachable state has)."""
    h, c, n, m = random_state(layer, batch, gen)
    return h, c, n.abs() + 0.5, m


CONFIGS = [
    dict(),
    dict(num_heads=2),
    dict(num_layers=2),
    dict(bidirectional=True),
    dict(num_layers=2, bidirectional=True, num_heads=2),
]


@pytest.mark.parametrize("name", ["lstm", "gru", "elman", "slstm"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in
                                                                      c.items()) or "default")
@pytest.mark.parametrize("backend", ["compiled", "fused", "reference"])
def test_layer_contract(name, config, backend):
    torch.manual_seed(0)
    options = dict(config)
    if name == "slstm":
        options.setdefault("num_heads", 1)
    layer = L.build(name, 4, backend=backend, **options)
    sampler = slstm_state if name == "slstm" else random_state
    check_layer_contract(layer, batch=3, steps=6, state_sampler=sampler,
                         skip=() if config == {} else ("gradcheck",))


@pytest.mark.parametrize("name", ["lstm", "gru", "elman"])
@pytest.mark.parametrize("config", [dict(), dict(num_layers=2, bidirectional=True)],
                         ids=["default", "2-layer-bidirectional"])
def test_native_backend_contract(name, config):
    torch.manual_seed(0)
    layer = L.build(name, 4, backend="native", **config)
    check_layer_contract(layer, batch=3, steps=6)


def test_elman_relu_contract():
    torch.manual_seed(0)
    check_layer_contract(L.build("elman", 4, nonlinearity="relu", backend="fused"),
                         batch=3, steps=6)


TORCH = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}


@pytest.mark.parametrize("name", ["lstm", "gru", "elman", "elman-relu"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("backend", ["native", "compiled", "fused", "reference"])
@pytest.mark.parametrize("batch_first", [True, False])
def test_torch_parity(name, dtype, tol, backend, batch_first):
    torch.manual_seed(1)
    kind = name.split("-")[0]
    extra = {"nonlinearity": "relu"} if name == "elman-relu" else {}
    ref = TORCH[kind](5, 6, num_layers=2, bidirectional=True, batch_first=batch_first,
                      dtype=dtype, **extra)
    ours = L.from_torch(ref, backend=backend)
    x = torch.randn(3, 7, 5, dtype=dtype)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    n_states = 2 if kind == "lstm" else 1
    h0 = tuple(torch.randn(4, 3, 6, dtype=dtype) for _ in range(n_states))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    s1 = tuple(h.clone().requires_grad_() for h in h0)
    s2 = tuple(h.clone().requires_grad_() for h in h0)
    y_ref, st_ref = ref(x1, s1 if kind == "lstm" else s1[0])
    st_ref = st_ref if kind == "lstm" else (st_ref,)
    y, st = ours(x2, s2)
    torch.testing.assert_close(y, y_ref, atol=tol, rtol=tol)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    gy = torch.randn_like(y)
    gs = [torch.randn_like(s) for s in st]
    g_ref = torch.autograd.grad((y_ref * gy).sum() + sum((a * b).sum() for a, b in
                                                         zip(st_ref, gs)),
                                [x1, *s1, *ref.parameters()])
    g = torch.autograd.grad((y * gy).sum() + sum((a * b).sum() for a, b in zip(st, gs)),
                            [x2, *s2, *ours.parameters()])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=10 * tol, rtol=10 * tol)


@pytest.mark.parametrize("kind", ["lstm", "gru", "elman"])
def test_lengths_match_torch_packed_sequences(kind):
    torch.manual_seed(2)
    ref = TORCH[kind](4, 5, num_layers=2, bidirectional=True, batch_first=True,
                      dtype=torch.float64)
    x = torch.randn(4, 6, 4, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 5, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                               enforce_sorted=False)
    y_ref, st_ref = ref(packed)
    y_ref, _ = nn.utils.rnn.pad_packed_sequence(y_ref, batch_first=True, total_length=6)
    st_ref = st_ref if kind == "lstm" else (st_ref,)
    for backend in ["native", "compiled", "fused"]:
        y, st = L.from_torch(ref, backend=backend)(x, lengths=lengths)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
        for a, b in zip(st, st_ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("name", ["lstm", "gru", "elman", "slstm"])
def test_heads_equal_independent_single_head_layers(name):
    """num_heads=N equals N independent single-head cells, each reading the whole input."""
    torch.manual_seed(3)
    N, dh, D = 3, 4, 5
    cls = {"lstm": L.LSTM, "gru": L.GRU, "elman": L.RNN, "slstm": L.SLSTM}[name]
    multi = cls(D, N * dh, num_heads=N, dtype=torch.float64)
    singles = [cls(D, dh, num_heads=1, dtype=torch.float64) for _ in range(N)]
    G = multi.gates
    with torch.no_grad():
        for n, single in enumerate(singles):
            rows = torch.cat([torch.arange(g * N * dh + n * dh, g * N * dh + (n + 1) * dh)
                              for g in range(G)])
            single.weight_ih_l0.copy_(multi.weight_ih_l0[rows])
            single.weight_hh_l0.copy_(multi.weight_hh_l0[rows])
            single.bias_ih_l0.copy_(multi.bias_ih_l0[rows])
            single.bias_hh_l0.copy_(multi.bias_hh_l0[rows])
    x = torch.randn(2, 7, D, dtype=torch.float64)
    y, st = multi(x)
    parts = [s(x) for s in singles]
    torch.testing.assert_close(y, torch.cat([p[0] for p in parts], -1), atol=1e-12, rtol=0)
    for j in range(len(st)):
        torch.testing.assert_close(st[j], torch.cat([p[1][j] for p in parts], -1),
                                   atol=1e-12, rtol=0)


def test_slstm_reference_matches_scalar_loop():
    """The sLSTM reference against the equations evaluated number by number in Python."""
    import math

    torch.manual_seed(4)
    T, dh = 5, 2
    wx = torch.randn(T, 1, 1, 4 * dh, dtype=torch.float64) * 2
    r = torch.randn(1, dh, 4 * dh, dtype=torch.float64)
    state0 = (torch.zeros(1, 1, dh, dtype=torch.float64),) * 4
    hs, cs, ns, ms = recurrence_reference("slstm", wx, r, state0)
    h, c, n, m = [0.0] * dh, [0.0] * dh, [0.0] * dh, [0.0] * dh
    for t in range(T):
        g = [wx[t, 0, 0, k].item() + sum(r[0, p, k].item() * h[p] for p in range(dh))
             for k in range(4 * dh)]
        new = []
        for d in range(dh):
            ir, fr, zr, orr = g[d], g[dh + d], g[2 * dh + d], g[3 * dh + d]
            logf = -math.log1p(math.exp(-fr)) + m[d]
            m2 = max(ir, logf)
            i, f = math.exp(ir - m2), math.exp(logf - m2)
            c2 = f * c[d] + i * math.tanh(zr)
            n2 = f * n[d] + i
            new.append((c2 / n2 / (1 + math.exp(-orr)), c2, n2, m2))
        h, c, n, m = (list(v) for v in zip(*new))
        for ref, got in zip((h, c, n, m), (hs, cs, ns, ms)):
            assert got[t, 0, 0].tolist() == pytest.approx(ref, abs=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru", "elman", "slstm"])
@pytest.mark.parametrize("backend", ["compiled", "fused"])
def test_hand_written_backward_gradcheck(cell, backend):
    torch.manual_seed(5)
    G, S = {"lstm": (4, 2), "gru": (3, 1), "elman": (1, 1), "slstm": (4, 4)}[cell]
    T, N, B, dh = 4, 2, 2, 3
    wx = torch.randn(T, N, B, G * dh, dtype=torch.float64, requires_grad=True)
    r = (0.5 * torch.randn(N, dh, G * dh, dtype=torch.float64)).requires_grad_()
    st = [torch.randn(N, B, dh, dtype=torch.float64) for _ in range(S)]
    if cell == "slstm":
        st[2] = st[2].abs() + 0.5
    st = [s.requires_grad_() for s in st]
    bhn = torch.randn(N, 1, dh, dtype=torch.float64, requires_grad=(cell == "gru"))

    def fn(wx, r, bhn, *st):
        return recurrence(cell, wx, r, st, bias_hn=bhn if cell == "gru" else None,
                          backend=backend)

    assert torch.autograd.gradcheck(fn, (wx, r, bhn, *st))


def test_backends_agree_in_float32_on_a_long_sequence():
    torch.manual_seed(6)
    # 16 features in 4 heads multiply heads in the C++ loop, 80 in 2 heads through batched BLAS
    cases = [("lstm", 1, 16), ("gru", 1, 16), ("elman", 1, 16), ("lstm", 4, 16),
             ("slstm", 4, 16), ("gru", 2, 80), ("slstm", 2, 80), ("elman", 2, 80)]
    for name, heads, d in cases:
        layer = L.build(name, d, num_heads=heads)
        x = torch.randn(2, 300, d, requires_grad=True)
        outs, grads = {}, {}
        backends = ["compiled", "fused", "reference"] + (["native"] if heads == 1 else [])
        for backend in backends:
            layer.backend = backend
            y = layer(x)[0]
            outs[backend] = y
            grads[backend] = torch.autograd.grad((y * y.detach().cos()).sum(), x)[0]
        for backend in backends[:-1] if heads == 1 else backends[:2]:
            torch.testing.assert_close(outs[backend], outs["reference"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(grads[backend], grads["reference"], atol=1e-5,
                                       rtol=1e-4)
        if heads == 1:
            torch.testing.assert_close(outs["native"], outs["reference"], atol=1e-5, rtol=1e-5)


def test_auto_backend_is_compiled_on_the_cpu():
    from recurra.layers.recurrent_stack import NATIVE_LSTM_MIN_WORK

    assert L.build("gru", 8).resolved_backend() == "compiled"
    assert L.build("slstm", 8).resolved_backend() == "compiled"
    assert L.build("lstm", 8, num_heads=2).resolved_backend() == "compiled"
    # single-head LSTM: torch's oneDNN kernel above batch x hidden = 1024, the C++ loop below
    lstm = L.build("lstm", 64)
    assert NATIVE_LSTM_MIN_WORK == 1024
    assert lstm.resolved_backend() == "native"
    assert lstm.resolved_backend(batch_size=16) == "compiled"
    assert lstm.resolved_backend(batch_size=17) == "native"


def test_auto_lstm_runs_the_backend_it_reports(monkeypatch):
    """A small batch runs the compiled loop, a large one torch's kernel: spy on both."""
    from recurra.layers import recurrent_stack

    torch.manual_seed(3)
    lstm = L.build("lstm", 64)
    calls = []
    native = recurrent_stack.StackedRNN._native_forward
    monkeypatch.setattr(recurrent_stack.StackedRNN, "_native_forward",
                        lambda self, *a: calls.append("native") or native(self, *a))
    compiled = recurrent_stack.recurrence
    monkeypatch.setattr(recurrent_stack, "recurrence",
                        lambda *a, **k: calls.append(k["backend"]) or compiled(*a, **k))
    for batch, want in ((2, "compiled"), (32, "native")):
        calls.clear()
        x = torch.randn(batch, 5, 64)
        y = lstm(x)[0]
        assert calls == [want]
        pinned = L.build("lstm", 64, backend="reference")
        pinned.load_state_dict(lstm.state_dict())
        torch.testing.assert_close(y, pinned(x)[0], atol=1e-5, rtol=1e-5)


def test_compiled_build_keeps_the_processes_denormals():
    # -ffast-math objects linked into a shared library can switch on flush-to-zero for the
    # whole process; the extension must not
    from recurra.ops import recurrent_compiled

    recurrent_compiled.load()
    assert (torch.tensor(1e-40) * 1).item() > 0
    assert (torch.tensor(1e-310, dtype=torch.float64) * 1).item() > 0


def test_auto_backend_warns_and_runs_fused_when_the_compiled_loop_is_unavailable(monkeypatch):
    from recurra.layers import recurrent_stack
    from recurra.ops import recurrent_compiled

    monkeypatch.setattr(recurrent_compiled.EXTENSION, "module", None)
    monkeypatch.setattr(recurrent_compiled.EXTENSION, "error", "no compiler here (test)")
    monkeypatch.setattr(recurrent_stack, "_compiled_checked", False)
    torch.manual_seed(8)
    layer = L.build("gru", 8)
    x = torch.randn(2, 5, 8)
    with pytest.warns(recurrent_stack.CompiledBackendWarning, match="no compiler here"):
        assert layer.resolved_backend() == "fused"
    y = layer(x)[0]
    layer.backend = "fused"
    torch.testing.assert_close(y, layer(x)[0], atol=0, rtol=0)
    layer.backend = "compiled"
    with pytest.raises(RuntimeError, match="no compiler here"):
        layer(x)


def test_state_round_trip_continues_the_sequence_exactly():
    torch.manual_seed(7)
    layer = L.build("slstm", 8, num_heads=2)
    x = torch.randn(2, 10, 8)
    y, s = layer(x)
    y1, s1 = layer(x[:, :4])
    y2, s2 = layer(x[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-6, rtol=1e-6)
    assert isinstance(s2, tuple) and len(s2) == 4


# ------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    layer = L.build("lstm", 4)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, time, 4\)"):
        layer(torch.randn(3, 4))
    with pytest.raises(ValueError, match="4 features"):
        layer(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"state\[0\] must have shape \(1, 2, 4\)"):
        layer(torch.randn(2, 3, 4), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match="dtype"):
        layer(torch.randn(2, 3, 4), (torch.zeros(1, 2, 4, dtype=torch.float64),) * 2)
    with pytest.raises(ValueError, match="must hold 2 tensors"):
        layer(torch.randn(2, 3, 4), (torch.zeros(1, 2, 4),))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 3\]"):
        layer(torch.randn(2, 3, 4), lengths=torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        layer(torch.randn(2, 3, 4), lengths=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown layer name 'lstmm'"):
        L.build("lstmm", 4)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        L.LSTM(4, 6, num_heads=4)
    with pytest.raises(ValueError, match="backend='native'"):
        L.LSTM(4, 8, num_heads=2, backend="native")
    with pytest.raises(ValueError, match="x_t must have shape"):
        layer.step(torch.randn(2, 1, 4))
    with pytest.raises(ValueError, match="not causal"):
        L.build("gru", 4, bidirectional=True).step(torch.randn(2, 4))
    with pytest.raises(ValueError, match="torch.nn.LSTM, GRU or RNN"):
        L.from_torch(nn.Linear(2, 2))


def test_registry_lists_every_layer_with_a_description():
    described = L.describe()
    for name in ["lstm", "gru", "elman", "slstm"]:
        assert name in L.available() and described[name]
        assert L.build(name, 8)(torch.randn(2, 3, 8))[0].shape == (2, 3, 8)
