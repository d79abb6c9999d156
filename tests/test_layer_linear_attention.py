import math

import pytest
import torch

from recurra.layers import build
from recurra.layers.linear_attention import LinearAttention
from recurra.ops.linear_attention import (
    feature_dim,
    feature_map,
    linear_attention_chunked,
    linear_attention_reference,
)
from recurra.testing import check_layer_contract, check_trains_in_language_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: extra threads only add synchronisation (very slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def positive_state(layer, batch, gen):
    """Random memory S; a positive normaliser z (as any real history gives with phi >= 0)."""
    shapes = layer.state_shapes(batch)
    out = [torch.randn(shapes[0], generator=gen, dtype=torch.float64)]
    if len(shapes) > 1:
        out.append(torch.rand(shapes[1], generator=gen, dtype=torch.float64) + 0.5)
    return tuple(out)


def dense_linear_attention(q, k, v, normalize, eps=1e-6):
    """Independent oracle: the masked quadratic form, y = (mask * q k^T) v / row sums."""
    t = q.shape[2]
    scores = (q @ k.transpose(-1, -2)) * torch.ones(t, t, dtype=q.dtype).tril()
    y = scores @ v
    if normalize:
        y = y / (scores.sum(-1, keepdim=True) + eps)
    return y


def test_taylor_feature_map_is_second_order_exp_series():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(5, 16, generator=g, dtype=torch.float64)
    k = torch.randn(5, 16, generator=g, dtype=torch.float64)
    s = (q * k).sum(-1) / math.sqrt(16)
    got = (feature_map(q, "taylor") * feature_map(k, "taylor")).sum(-1)
    torch.testing.assert_close(got, 1 + s + s * s / 2, atol=1e-12, rtol=1e-12)
    assert feature_dim("taylor", 16) == 1 + 16 + 256
    torch.testing.assert_close(feature_map(q, "elu"), torch.nn.functional.elu(q) + 1)


@pytest.mark.parametrize("kind,normalize", [("identity", False), ("elu", False), ("elu", True),
                                            ("taylor", False), ("taylor", True)])
def test_chunked_equals_reference_and_dense(kind, normalize):
    g = torch.Generator().manual_seed(0)
    b, h, t, d, dv = 2, 3, 23, 4, 5
    q = feature_map(torch.randn(b, h, t, d, generator=g, dtype=torch.float64), kind)
    k = feature_map(torch.randn(b, h, t, d, generator=g, dtype=torch.float64), kind)
    v = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    f = q.shape[-1]
    # dense oracle from an empty state
    y_ref, _ = linear_attention_reference(q, k, v, None, normalize)
    torch.testing.assert_close(y_ref, dense_linear_attention(q, k, v, normalize),
                               atol=1e-10, rtol=1e-10)
    # chunked vs loop with an initial state: outputs, final states and all gradients
    s0 = (torch.randn(b, h, f, dv, generator=g, dtype=torch.float64),)
    if normalize:
        s0 = s0 + (torch.rand(b, h, f, generator=g, dtype=torch.float64) + 0.5,)
    leaves = [a.clone().requires_grad_() for a in (q, k, v, *s0)]
    gy = torch.randn(b, h, t, dv, generator=g, dtype=torch.float64)
    results = []
    for op in (linear_attention_reference,
               lambda *a: linear_attention_chunked(*a, chunk_size=8)):
        y, st = op(leaves[0], leaves[1], leaves[2], tuple(leaves[3:]), normalize)
        loss = (y * gy).sum() + sum((s * s.detach().sin()).sum() for s in st)
        results.append((y.detach(), [s.detach() for s in st],
                        torch.autograd.grad(loss, leaves)))
    (y1, s1, g1), (y2, s2, g2) = results
    torch.testing.assert_close(y2, y1, atol=1e-10, rtol=1e-9)
    for a, c in zip(s2, s1):
        torch.testing.assert_close(a, c, atol=1e-10, rtol=1e-9)
    for a, c in zip(g2, g1):
        torch.testing.assert_close(a, c, atol=1e-9, rtol=1e-8)


@pytest.mark.parametrize("kind", ["identity", "elu", "taylor"])
def test_layer_contract(kind):
    layer = LinearAttention(4, heads=2, feature_map=kind, key_dim=2, chunk_size=4)
    check_layer_contract(layer, state_sampler=positive_state, steps=9)


def test_registered_and_builds():
    layer = build("linear_attention", 16, heads=4, feature_map="taylor", key_dim=4)
    y, state = layer(torch.randn(2, 5, 16))
    assert y.shape == (2, 5, 16)
    assert state[0].shape == (2, 4, 1 + 4 + 16, 4)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="feature_map"):
        LinearAttention(8, feature_map="relu")
    with pytest.raises(ValueError, match="heads"):
        LinearAttention(8, heads=3)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention_chunked(*(torch.zeros(1, 1, 2, 2),) * 3, chunk_size=0)
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention_chunked(*(torch.zeros(1, 1, 2, 2),) * 3,
                                 initial_state=(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 2)))


def test_trains_and_decodes_inside_recurrent_lm():
    check_trains_in_language_model("linear_attention",
                                   {"heads": 2, "feature_map": "elu", "chunk_size": 8})


@pytest.mark.parametrize("with_lengths", [False, True])
def test_long_inputs_run_in_blocks_with_the_same_function(monkeypatch, with_lengths):
    """A long input runs in blocks of whole chunks with the state carried (``run_in_blocks``):
    outputs, final states and gradients equal one pass (float64, to rounding), padding included
    (a row that ends before a block leaves its state untouched through it)."""
    torch.manual_seed(0)
    layer = LinearAttention(8, heads=2, feature_map="elu", chunk_size=4).double()
    x = torch.randn(3, 23, 8, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([23, 9, 2]) if with_lengths else None

    def run(block_tokens):
        monkeypatch.setattr(LinearAttention, "block_tokens", block_tokens)
        y, state = layer(x, lengths=lengths)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=x.dtype).view_as(y)).sum() \
            + sum((s * s).sum() for s in state)
        return y.detach(), state, torch.autograd.grad(loss, [x, *layer.parameters()])

    whole = run(1024)
    for block_tokens in (4, 8, 10):                                  # 10 -> blocks of 8
        blocked = run(block_tokens)
        torch.testing.assert_close(blocked[0], whole[0], atol=1e-12, rtol=1e-12)
        for a, b in zip((*blocked[1], *blocked[2]), (*whole[1], *whole[2])):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
