"""TransformerLM: KV cache, tree masks and cache surgery against independent recomputation."""

from __future__ import annotations

import math

import pytest
import torch
from decode_models import single_thread  # noqa: F401

from recurra.models import build_model, model_config
from recurra.models.transformer_lm import TransformerLM, compact_cache, crop_cache, reorder_cache


def make(positions="rope", seed=0):
    torch.manual_seed(seed)
    return TransformerLM(31, 32, 2, n_heads=4, max_len=64, positions=positions).double().eval()


def rotate(z, cos, sin):
    """RoPE by its definition: rotate each (z1_i, z2_i) pair by angle theta_i."""
    half = z.shape[-1] // 2
    z1, z2 = z[..., :half], z[..., half:]
    return torch.cat((z1 * cos - z2 * sin, z2 * cos + z1 * sin), dim=-1)


def naive_forward(model, tokens):
    """Plain re-implementation: explicit softmax attention with a causal loop (the oracle)."""
    x = model.embedding(tokens)
    _b, t, d = x.shape
    pos = torch.arange(t)
    if model.position_embedding is not None:
        x = x + model.position_embedding(pos)
    for block in model.blocks:
        a = block.attn
        h = block.norm_attn(x)
        q, k, v = a.qkv(h).split(d, dim=-1)
        heads = []
        for head in range(a.n_heads):
            sl = slice(head * a.head_dim, (head + 1) * a.head_dim)
            qh, kh, vh = q[..., sl], k[..., sl], v[..., sl]
            if a.rope:
                half = a.head_dim // 2
                freq = a.rope_base ** (-torch.arange(half, dtype=torch.float64) * 2 / a.head_dim)
                ang = pos[:, None].double() * freq[None]
                cos, sin = ang.cos(), ang.sin()
                qh, kh = rotate(qh, cos, sin), rotate(kh, cos, sin)
            out = torch.zeros_like(qh)
            for i in range(t):
                w = torch.softmax(qh[:, i:i + 1] @ kh[:, :i + 1].transpose(1, 2)
                                  / math.sqrt(a.head_dim), dim=-1)
                out[:, i] = (w @ vh[:, :i + 1])[:, 0]
            heads.append(out)
        x = x + a.out(torch.cat(heads, dim=-1))
        x = x + block.mlp(block.norm_mlp(x))
    return model.head(model.norm(x))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_forward_matches_naive_attention(positions):
    model = make(positions)
    tokens = torch.randint(0, 31, (2, 9))
    logits, _ = model(tokens)
    torch.testing.assert_close(logits, naive_forward(model, tokens), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_cache_chunks_and_steps_match_one_pass(positions):
    model = make(positions)
    tokens = torch.randint(0, 31, (2, 12))
    full, cache = model(tokens)
    assert cache[0][0].shape == (2, 4, 12, 8)
    a, c = model(tokens[:, :5])
    b, c = model(tokens[:, 5:], c)
    torch.testing.assert_close(torch.cat((a, b), 1), full, rtol=1e-12, atol=1e-12)
    c, steps = None, []
    for t in range(12):
        out, c = model(tokens[:, t:t + 1], c)
        steps.append(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-12, atol=1e-12)
    last, _ = model(tokens, logits_to_keep=1)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-12, atol=1e-12)


def test_tree_mask_positions_and_compaction():
    model = make()
    prefix = torch.randint(0, 31, (1, 6))
    _, cache = model(prefix)
    # tree: 0 -> 1, 0 -> 2, 2 -> 3, 3 -> 4, 1 -> 5
    tokens = torch.tensor([[3, 7, 8, 9, 10, 11]])
    parents = [-1, 0, 0, 2, 3, 1]
    depth = [0, 1, 1, 2, 3, 2]
    n = len(parents)
    anc = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        j = i
        while j >= 0:
            anc[i, j] = True
            j = parents[j]
    mask = torch.cat((torch.ones(n, 6, dtype=torch.bool), anc), 1)[None]
    logits, tree_cache = model(tokens, cache, position_ids=6 + torch.tensor(depth),
                               attention_mask=mask)
    for node in range(n):
        path, j = [], node
        while j >= 0:
            path.append(j)
            j = parents[j]
        path = path[::-1]
        seq = torch.cat((prefix, tokens[:, path]), 1)
        ref, _ = model(seq)
        torch.testing.assert_close(logits[0, node], ref[0, -1], rtol=1e-10, atol=1e-10)
    # keep path 0 -> 2 -> 3, continue, and compare with a fresh run
    kept = compact_cache(tree_cache, 6, [0, 2, 3])
    kept = crop_cache(kept, 9)
    nxt, _ = model(torch.tensor([[5]]), kept)
    ref, _ = model(torch.cat((prefix, torch.tensor([[3, 8, 9, 5]])), 1))
    torch.testing.assert_close(nxt[0, -1], ref[0, -1], rtol=1e-10, atol=1e-10)


def test_reorder_cache_selects_rows():
    model = make()
    tokens = torch.randint(0, 31, (3, 5))
    _, cache = model(tokens)
    idx = torch.tensor([2, 2, 0])
    out, _ = model(torch.tensor([[1], [1], [1]]), reorder_cache(cache, idx))
    ref, _ = model(torch.cat((tokens[idx], torch.ones(3, 1, dtype=torch.long)), 1))
    torch.testing.assert_close(out[:, -1], ref[:, -1], rtol=1e-10, atol=1e-10)


def test_build_model_roundtrip_and_bad_input():
    model = make()
    config = model_config(model)
    assert config["architecture"] == "transformer"
    clone = build_model(config)
    assert isinstance(clone, TransformerLM) and clone.config == model.config
    with pytest.raises(ValueError, match="tokens"):
        model(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="tokens must lie"):
        model(torch.full((1, 2), 31))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, 3))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="d_model"):
        TransformerLM(10, 30, 1, n_heads=4)
