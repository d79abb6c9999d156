import random

import pytest
import torch

from recurra.layers import build
from recurra.layers.aaren import Aaren
from recurra.ops.aaren import aaren_chunked, aaren_combine, aaren_reference, empty_state
from recurra.testing import check_layer_contract, check_trains_in_language_model

D = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny problems: extra threads only add synchronisation (very slow on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def prefix_softmax(s, v):
    """Oracle: softmax attention of the one query over every prefix, by torch.softmax."""
    t = s.shape[-1]
    return torch.stack([torch.softmax(s[..., :k + 1], -1).unsqueeze(-2) @ v[..., :k + 1, :]
                        for k in range(t)], 2).squeeze(-2)


def finite_state(layer_or_shape, batch, gen):
    h, dv = layer_or_shape.heads, layer_or_shape.value_dim
    return (torch.randn(batch, h, generator=gen, dtype=D),
            torch.rand(batch, h, generator=gen, dtype=D) + 0.5,
            torch.randn(batch, h, dv, generator=gen, dtype=D))


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_equals_softmax_over_every_prefix_float32(scale):
    gen = torch.Generator().manual_seed(0)
    s = scale * torch.randn(2, 3, 37, generator=gen)
    s[0, 0] += scale  # a large common offset on one head
    v = torch.randn(2, 3, 37, 5, generator=gen)
    want = prefix_softmax(s, v)
    for o, _ in (aaren_reference(s, v), aaren_chunked(s, v, chunk_size=8)):
        assert torch.isfinite(o).all()
        torch.testing.assert_close(o, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 4, 64])
def test_chunked_equals_loop_with_state_and_gradients(chunk):
    gen = torch.Generator().manual_seed(1)
    s = 3 * torch.randn(2, 3, 23, generator=gen, dtype=D)
    v = torch.randn(2, 3, 23, 4, generator=gen, dtype=D)
    m0 = torch.randn(2, 3, generator=gen, dtype=D)
    u0 = torch.rand(2, 3, generator=gen, dtype=D) + 0.5
    w0 = torch.randn(2, 3, 4, generator=gen, dtype=D)
    leaves = [a.requires_grad_() for a in (s, v, m0, u0, w0)]
    cot = [torch.randn(shape, generator=gen, dtype=D)
           for shape in ((2, 3, 23, 4), (2, 3), (2, 3), (2, 3, 4))]
    res = []
    for op in (aaren_reference, lambda *a: aaren_chunked(*a, chunk_size=chunk)):
        o, st = op(s, v, (m0, u0, w0))
        loss = sum((a * c).sum() for a, c in zip((o, *st), cot))
        res.append(((o, *st), torch.autograd.grad(loss, leaves)))
    for a, c in zip(res[0][0] + res[0][1], res[1][0] + res[1][1]):
        torch.testing.assert_close(c, a, atol=1e-10, rtol=1e-9)


def test_empty_state_and_minus_inf_scores():
    s = torch.tensor([[[float("-inf"), float("-inf"), 2.0, float("-inf"), -1.0]]], dtype=D)
    v = torch.arange(5, dtype=D).view(1, 1, 5, 1)
    for o, (m, u, w) in (aaren_reference(s, v), aaren_chunked(s, v, chunk_size=2)):
        assert o[0, 0, :2].abs().sum() == 0          # nothing seen yet: zero output
        torch.testing.assert_close(o[0, 0, 2:4, 0], torch.tensor([2.0, 2.0], dtype=D))
        torch.testing.assert_close(o[0, 0, 4], prefix_softmax(s[..., 2:], v[..., 2:, :])[0, 0, -1])
        assert m.item() == 2.0


def test_any_bracketing_of_the_operator_gives_the_same_result():
    gen = torch.Generator().manual_seed(2)
    s = 50 * torch.randn(1, 2, 16, generator=gen, dtype=D)
    v = torch.randn(1, 2, 16, 3, generator=gen, dtype=D)
    _, (m, u, w) = aaren_reference(s, v)
    rng = random.Random(0)
    for _ in range(5):
        items = [(s[..., i], torch.ones_like(s[..., i]), v[..., i, :]) for i in range(16)]
        items.insert(0, empty_state(1, 2, 3, D))
        while len(items) > 1:
            i = rng.randrange(len(items) - 1)
            items[i:i + 2] = [aaren_combine(items[i], items[i + 1])]
        torch.testing.assert_close(items[0][0], m)
        torch.testing.assert_close(items[0][1], u)
        torch.testing.assert_close(items[0][2], w)


def test_layer_contract():
    torch.manual_seed(0)
    check_layer_contract(Aaren(4, heads=2, chunk_size=4), steps=9, state_sampler=finite_state)


def test_layer_contract_from_empty_state_without_gradcheck():
    # the empty state holds -inf: finite differences cannot probe it, the other checks can
    torch.manual_seed(0)
    check_layer_contract(Aaren(4, heads=2, chunk_size=4), steps=9,
                         state_sampler=lambda layer, b, g: layer.init_state(b),
                         skip=("gradcheck",))


def test_layer_is_attention_with_a_learned_query():
    torch.manual_seed(0)
    layer = build("aaren", 8, heads=2).double()
    x = torch.randn(2, 12, 8, dtype=D)
    k = layer.k_proj(x).view(2, 12, 2, 4)
    s = torch.einsum("bthd,hd->bht", k, layer.query) / 2.0
    v = layer.v_proj(x).view(2, 12, 2, 4).transpose(1, 2)
    want = layer.out_proj(prefix_softmax(s, v).transpose(1, 2).reshape(2, 12, 8))
    torch.testing.assert_close(layer(x)[0], want, atol=1e-12, rtol=1e-10)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="heads"):
        Aaren(6, heads=4)
    with pytest.raises(ValueError, match="initial_state"):
        aaren_chunked(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3, 4),
                      (torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2, 5)))


def test_trains_and_decodes_inside_recurrent_lm():
    check_trains_in_language_model("aaren", {"heads": 2, "chunk_size": 8})
