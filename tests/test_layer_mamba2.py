import pytest
import torch

from recurra.layers import build
from recurra.layers.mamba2 import Mamba2
from recurra.ops.ssd import segsum, ssd_chunked, ssd_quadratic, ssd_reference
from recurra.ops.ssd_window import ssd_window_chunked, ssd_window_reference
from recurra.testing import check_layer_contract, check_trains_in_language_model

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: extra threads only add synchronisation (very slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def problem(b=2, t=23, h=4, p=3, g=2, n=5, seed=0, dtype=D, decay=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, h, p, generator=gen, dtype=dtype)
    log_a = -decay * torch.rand(b, t, h, generator=gen, dtype=dtype)
    B = torch.randn(b, t, g, n, generator=gen, dtype=dtype)
    C = torch.randn(b, t, g, n, generator=gen, dtype=dtype)
    h0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return x, log_a, B, C, h0


def run_with_grads(op, leaves, seed=1):
    """Outputs, final state and gradients of <y, gy> + <h, gh> for random cotangents."""
    y, h = op(*leaves)[:2]
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype)
    gh = torch.randn(h.shape, generator=gen, dtype=h.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    return y.detach(), h.detach(), grads


def assert_all_close(a, b, atol=1e-10, rtol=1e-9):
    ya, ha, ga = a
    yb, hb, gb = b
    torch.testing.assert_close(ya, yb, atol=atol, rtol=rtol)
    torch.testing.assert_close(ha, hb, atol=atol, rtol=rtol)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=atol, rtol=rtol)


def test_segsum_is_the_masked_sum():
    a = torch.randn(6, dtype=D)
    s = segsum(a)
    for i in range(6):
        for j in range(6):
            want = a[j + 1:i + 1].sum() if j <= i else float("-inf")
            assert s[i, j].item() == pytest.approx(float(want), abs=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 8, 64])
def test_chunked_equals_sequential_equals_quadratic(chunk):
    leaves = [a.requires_grad_() for a in problem()]
    ref = run_with_grads(ssd_reference, leaves)
    assert_all_close(run_with_grads(ssd_quadratic, leaves), ref)
    assert_all_close(run_with_grads(lambda *a: ssd_chunked(*a, chunk_size=chunk), leaves), ref)


@pytest.mark.parametrize("chunks_per_slab", [1, 2, 3])
def test_chunked_in_slabs_equals_sequential(monkeypatch, chunks_per_slab):
    """The intra-chunk part runs a slab of chunks at a time (sized by SLAB_BYTES); slabs of one
    chunk, of two and of three (the last one short) give the loop's outputs and gradients."""
    from recurra.ops import ssd

    b, t, h, p, g, n, q = 2, 23, 4, 3, 2, 5, 5                 # 5 chunks
    per_chunk = b * g * (h // g) * q * max(q, p, n) * 8
    monkeypatch.setattr(ssd, "SLAB_BYTES", chunks_per_slab * per_chunk)
    leaves = [a.requires_grad_() for a in problem(b, t, h, p, g, n)]
    ref = run_with_grads(ssd_reference, leaves)
    assert_all_close(run_with_grads(lambda *a: ssd_chunked(*a, chunk_size=q), leaves), ref)


def test_split_sequences_with_carried_state_equal_one_pass():
    x, la, B, C, h0 = problem(t=30)
    y, h = ssd_chunked(x, la, B, C, h0, chunk_size=8)
    ys, state = [], h0
    for lo, hi in [(0, 7), (7, 8), (8, 21), (21, 30)]:
        y_part, state = ssd_chunked(x[:, lo:hi], la[:, lo:hi], B[:, lo:hi], C[:, lo:hi], state,
                                    chunk_size=8)
        ys.append(y_part)
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(state, h, atol=1e-10, rtol=1e-9)


def test_chunked_float32_stays_accurate_under_strong_decay():
    # cumulative log-decays reach about -2000 over the sequence: the chunked form must not take
    # differences of large cumulative sums
    x, la, B, C, h0 = problem(t=200, decay=20.0)
    y64, h64 = ssd_reference(x, la, B, C, h0)
    y32, h32 = ssd_chunked(*(a.float() for a in (x, la, B, C, h0)), chunk_size=64)
    torch.testing.assert_close(y32.double(), y64, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(h32.double(), h64, atol=2e-5, rtol=1e-4)


def test_state_normalisation_bounds_the_state():
    x, la, B, C, h0 = problem(t=40, decay=0.0)  # no decay: the state norm grows
    _, h_free = ssd_reference(x, la, B, C, h0)
    _, h_norm = ssd_reference(x, la, B, C, h0, max_state_norm=2.0)
    assert h_free.flatten(-2).norm(dim=-1).max() > 4.0
    norms = h_norm.flatten(-2).norm(dim=-1)
    assert norms.max() <= 2.0 + 1e-12
    assert (norms > 2.0 - 1e-12).sum() >= norms.numel() // 2  # most heads sit at the bound
    # one step by hand: scale back to the bound only when it is exceeded
    h1 = h0 + x[:, 0].unsqueeze(-1) * B[:, 0].repeat_interleave(2, 1).unsqueeze(-2)
    scale = (2.0 / h1.flatten(-2).norm(dim=-1)).clamp(max=1.0)
    _, h_one = ssd_reference(x[:, :1], la[:, :1], B[:, :1], C[:, :1], h0, max_state_norm=2.0)
    torch.testing.assert_close(h_one, h1 * scale[..., None, None])
    _, h_big = ssd_reference(x, la, B, C, h0, max_state_norm=1e9)
    torch.testing.assert_close(h_big, h_free)


def window_problem(w=4, **kw):
    x, la, B, C, h0 = problem(**kw)
    gen = torch.Generator().manual_seed(7)
    b, _, h, p = x.shape
    g, n = B.shape[2:]
    bufs = (torch.randn(b, w, h, p, generator=gen, dtype=D),
            torch.randn(b, w, g, n, generator=gen, dtype=D),
            -torch.rand(b, w, h, generator=gen, dtype=D))
    return x, la, B, C, h0, bufs


@pytest.mark.parametrize("w", [1, 4, 7])
def test_window_chunked_equals_state_difference_loop(w):
    x, la, B, C, h0, bufs = window_problem(w=w)
    leaves = [a.requires_grad_() for a in (x, la, B, C, h0, *bufs)]

    def op(fn):
        def run(x, la, B, C, h0, *bufs):
            y, h, nb = fn(x, la, B, C, h0, tuple(bufs))
            return y, torch.cat([h.flatten(1)] + [a.flatten(1) for a in nb], 1)
        return run

    assert_all_close(run_with_grads(op(ssd_window_chunked), leaves),
                     run_with_grads(op(ssd_window_reference), leaves))


def test_window_from_empty_state_is_a_scan_over_the_last_w_tokens():
    w = 5
    x, la, B, C, _ = problem(t=17)
    b, _, h, p = x.shape
    empty = (x.new_zeros(b, w, h, p), B.new_zeros(b, w, *B.shape[2:]), la.new_zeros(b, w, h))
    y, _, _ = ssd_window_chunked(x, la, B, C, None, empty)
    for t in range(17):
        lo = max(0, t - w + 1)
        y_full, _ = ssd_reference(x[:, lo:t + 1], la[:, lo:t + 1], B[:, lo:t + 1],
                                  C[:, lo:t + 1])
        torch.testing.assert_close(y[:, t], y_full[:, -1], atol=1e-10, rtol=1e-9)


CONTRACT = {"d_state": 3, "head_dim": 2, "expand": 2, "n_groups": 2, "conv_kernel": 3, "chunk_size": 4}


@pytest.mark.parametrize("options", [
    {},
    {"decay_scale": 2.0, "insert_scale": 0.5, "n_groups": 1, "conv_kernel": 1},
    {"window": 3},
], ids=["default", "decay-insert", "window"])
def test_layer_contract(options):
    torch.manual_seed(0)
    check_layer_contract(Mamba2(4, **{**CONTRACT, **options}), steps=9)


def test_layer_contract_state_norm():
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="sequential"):
        layer = Mamba2(4, max_state_norm=0.5, **CONTRACT)
    check_layer_contract(layer, steps=7)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="head_dim"):
        Mamba2(8, head_dim=5)
    with pytest.raises(ValueError, match="n_groups"):
        Mamba2(8, head_dim=4, n_groups=3)
    with pytest.raises(ValueError, match="window"):
        Mamba2(8, head_dim=4, window=0)
    with pytest.raises(ValueError, match="initial_state"):
        x, la, B, C, h0 = problem()
        ssd_chunked(x, la, B, C, h0[:, :2])


def test_registered():
    layer = build("mamba2", 16, d_state=8, head_dim=8)
    y, (conv, h) = layer(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16) and h.shape == (2, 4, 8, 8) and conv.shape == (2, 3, 48)


def test_trains_and_decodes_inside_recurrent_lm():
    check_trains_in_language_model("mamba2", {"d_state": 8, "head_dim": 8, "chunk_size": 8})


@pytest.mark.parametrize("with_lengths", [False, True])
def test_long_inputs_run_in_blocks_with_the_same_numbers(monkeypatch, with_lengths):
    """A long input runs in blocks of whole chunks with the state carried: outputs, final
    states and gradients equal one unblocked pass bit for bit (padding included: a row that ends
    before a block leaves its state untouched through it)."""
    torch.manual_seed(0)
    layer = Mamba2(8, d_state=4, head_dim=4, chunk_size=4).double()
    x = torch.randn(3, 23, 8, dtype=D, requires_grad=True)
    lengths = torch.tensor([23, 9, 2]) if with_lengths else None

    def run(block_tokens):
        monkeypatch.setattr(Mamba2, "block_tokens", block_tokens)
        y, state = layer(x, lengths=lengths)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=D).view_as(y)).sum() \
            + sum((s * s).sum() for s in state)
        grads = torch.autograd.grad(loss, [x, *layer.parameters()])
        return y.detach(), [s.detach() for s in state], grads

    whole = run(1024)
    for block_tokens in (4, 8, 10):                                  # 10 -> blocks of 8
        blocked = run(block_tokens)
        assert torch.equal(blocked[0], whole[0])
        for a, b in zip(blocked[1], whole[1]):
            assert torch.equal(a, b)
        for a, b in zip(blocked[2], whole[2]):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
