import pytest
import torch

from recurra.layers.jrt import PrefixLinearAttention
from recurra.layers.linear_attention import LinearAttention
from recurra.ops.linear_attention import feature_map
from recurra.testing import check_layer_contract

M = 4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: extra threads only add synchronisation (very slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def memory_state(seen, prefix):
    def sample(layer, batch, gen):
        shapes = layer.state_shapes(batch)
        s = torch.randn(shapes[0], generator=gen, dtype=torch.float64)
        z = torch.rand(shapes[1], generator=gen, dtype=torch.float64) + 0.5
        return (s, z, torch.full((batch,), float(seen), dtype=torch.float64),
                torch.full((batch,), float(prefix), dtype=torch.float64))
    return sample


def small_layer(**kw):
    torch.manual_seed(0)
    return PrefixLinearAttention(4, prefix_length=M, heads=2, key_dim=2, chunk_size=4, **kw)


def test_contract_from_a_fresh_sequence():
    # the prefix (first M tokens) is read non-causally: padding and gradcheck checks
    check_layer_contract(small_layer(), steps=9, state_sampler=memory_state(0, 0))


class _AfterPrefix(PrefixLinearAttention):
    """Past its prefix the layer is a causal decoder: check step and chunk carry too."""

    causal = True


def test_contract_after_the_prefix_is_causal():
    layer = _AfterPrefix(4, prefix_length=M, heads=2, key_dim=2, chunk_size=4)
    check_layer_contract(layer, steps=7, state_sampler=memory_state(M, M))


def dense_prefix_attention(layer, x, m=M):
    """Oracle: the formula of the paper, written densely from the layer's projections."""
    b, t, _ = x.shape
    h = layer.heads

    def heads(y):
        return y.view(b, t, h, -1).transpose(1, 2)

    q = feature_map(heads(layer.q_proj(x)), "taylor")
    k = feature_map(heads(layer.k_proj(x)), "taylor")
    v = heads(layer.v_proj(x))
    ke = feature_map(heads(layer.ke_proj(x)), "taylor")[:, :, :m]
    ve = heads(layer.ve_proj(x))[:, :, :m]
    causal = torch.ones(t, t, dtype=x.dtype).tril()
    num = (q @ k.transpose(-1, -2) * causal) @ v + (q @ ke.transpose(-1, -2)) @ ve
    den = (q @ k.transpose(-1, -2) * causal).sum(-1) + (q @ ke.transpose(-1, -2)).sum(-1)
    y = num / (den.unsqueeze(-1) + layer.eps)
    return layer.out_proj(y.transpose(1, 2).reshape(b, t, -1))


def test_matches_dense_formula_and_prefill_then_decode():
    layer = small_layer().double()
    x = torch.randn(2, 11, 4, dtype=torch.float64)
    y, state = layer(x)
    torch.testing.assert_close(y, dense_prefix_attention(layer, x), atol=1e-10, rtol=1e-9)
    assert state[2].tolist() == [11.0, 11.0] and state[3].tolist() == [M, M]
    # prefill the first M + 1 tokens, then decode token by token
    check_prefill_then_steps(layer, x, M + 1, y, state)


def check_prefill_then_steps(layer, x, n, y, state, **prefix):
    """Prefill ``x[:, :n]``, step through the rest: the outputs and final state are ``y, state``."""
    y_pre, st = layer(x[:, :n], **prefix)
    ys = [y_pre]
    for t in range(n, x.shape[1]):
        y_t, st = layer.step(x[:, t], st)
        ys.append(y_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-10, rtol=1e-9)
    for a, c in zip(st, state):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-9)


def test_prefix_order_does_not_matter_after_the_prefix():
    # encoder and decoder memories are sums over the prefix: any order of it decodes the same
    layer = small_layer().double()
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    perm = torch.tensor([2, 0, 3, 1])
    x_perm = torch.cat([x[:, perm], x[:, M:]], 1)
    y, st = layer(x)
    y_perm, st_perm = layer(x_perm)
    torch.testing.assert_close(y_perm[:, M:], y[:, M:], atol=1e-12, rtol=1e-10)
    for a, c in zip(st_perm, st):
        torch.testing.assert_close(a, c, atol=1e-12, rtol=1e-10)
    assert not torch.allclose(y_perm[:, :M], y[:, :M])  # the prefix outputs themselves move


def test_prefix_tokens_see_the_future_but_decoder_tokens_do_not():
    layer = small_layer().double()
    x = torch.randn(1, 10, 4, dtype=torch.float64, requires_grad=True)
    y, _ = layer(x)
    g0 = torch.autograd.grad(y[0, 0].sum(), x, retain_graph=True)[0]
    assert g0[0, M - 1].abs().sum() > 0          # position 0 reads the last prefix token
    assert g0[0, M:].abs().sum() == 0            # but nothing after the prefix
    g6 = torch.autograd.grad(y[0, 6].sum(), x)[0]
    assert g6[0, 7:].abs().sum() == 0


def test_continuing_inside_the_prefix_raises():
    layer = small_layer()
    _, st = layer(torch.randn(1, M - 1, 4))
    with pytest.raises(ValueError, match="prefix"):
        layer(torch.randn(1, 2, 4), st)
    with pytest.raises(ValueError, match="prefill"):
        layer.step(torch.randn(1, 4))


def test_per_row_prefix_lengths_match_the_dense_formula_row_by_row():
    layer = small_layer().double()
    x = torch.randn(3, 8, 4, dtype=torch.float64)
    prefix = [0, 2, 5]
    y, state = layer(x, prefix_lengths=torch.tensor(prefix))
    for b, m in enumerate(prefix):
        torch.testing.assert_close(y[b:b + 1], dense_prefix_attention(layer, x[b:b + 1], m),
                                   atol=1e-10, rtol=1e-9)
    assert state[3].tolist() == prefix
    # an int is every row's prefix; prefix 0 is causal linear attention with the Taylor map
    y0, _ = layer(x, prefix_lengths=0)
    plain = LinearAttention(4, heads=2, feature_map="taylor", key_dim=2, chunk_size=4).double()
    plain.load_state_dict({k: v for k, v in layer.state_dict().items()
                           if not k.startswith(("ke_", "ve_"))})
    torch.testing.assert_close(y0, plain(x)[0], atol=1e-12, rtol=1e-10)


def test_per_row_prefix_then_decode_equals_one_pass():
    layer = small_layer().double()
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    prefix = torch.tensor([3, 6])
    y, state = layer(x, prefix_lengths=prefix)
    check_prefill_then_steps(layer, x, 6, y, state, prefix_lengths=prefix)


def test_prefix_lengths_bad_input():
    layer = small_layer()
    x = torch.randn(2, 5, 4)
    for bad, match in ((6, r"\[0, 5\]"), (-1, r"\[0, 5\]"), ([1, 2, 3], r"shape \(2,\)"),
                       (torch.tensor([1.0, 2.0]), "integers"), (True, "bool")):
        with pytest.raises(ValueError, match=match):
            layer(x, prefix_lengths=bad)
    _, st = layer(x, prefix_lengths=2)
    with pytest.raises(ValueError, match="continue a sequence"):
        layer(x, st, prefix_lengths=2)
    layer(x, st, prefix_lengths=0)  # 0 for continuing rows is fine
    with pytest.raises(ValueError, match="prefix_length must be an int >= 0"):
        PrefixLinearAttention(4, prefix_length=-1)
