"""recurra.ops.llama_decode: LlamaLM's compiled few-token forward against its torch forward, and
its row independence (a token's logits bitwise the same decoded alone or inside a draft tree)."""

import pytest
import torch

from recurra.models.llama import LlamaLM
from recurra.ops import chunked_scan_compiled, llama_decode

pytestmark = pytest.mark.skipif(not chunked_scan_compiled.EXTENSION.available(),
                                reason="the C++ inference kernels cannot be built here")

# head_dim 8: scalar tails everywhere; head_dim 32: whole float vectors, 2 per score block
CONFIGS = {"gqa_small_heads": dict(vocab_size=61, d_model=48, n_layers=2, n_heads=6,
                                   n_kv_heads=2, head_dim=8, intermediate_size=40),
           "mha_vector_heads": dict(vocab_size=61, d_model=64, n_layers=2, n_heads=2,
                                    n_kv_heads=2, head_dim=32, intermediate_size=72),
           "gqa_group_5": dict(vocab_size=61, d_model=40, n_layers=1, n_heads=5, n_kv_heads=1,
                               head_dim=16, intermediate_size=24)}


def make(config, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = LlamaLM(**CONFIGS[config]).to(dtype).eval()
    with torch.no_grad():  # norms away from 1, so a mistake in them shows
        for b in model.blocks:
            b.norm_attn.uniform_(0.5, 1.5)
            b.norm_mlp.uniform_(0.5, 1.5)
        model.norm.uniform_(0.5, 1.5)
    return model


def both(model, *args, **kw):
    """(compiled, torch) results of one call."""
    with torch.no_grad():
        model.backend = "torch"
        ref = model(*args, **kw)
        model.backend = "auto"
        got = model(*args, **kw)
    return got, ref


def assert_results_close(got, ref, tol):
    torch.testing.assert_close(got[0], ref[0], **tol)
    for (kg, vg), (kr, vr) in zip(got[1], ref[1]):
        torch.testing.assert_close(kg, kr, **tol)
        torch.testing.assert_close(vg, vr, **tol)
    if len(got) > 2:
        torch.testing.assert_close(got[2], ref[2], **tol)


TOLS = {torch.float64: {"atol": 1e-12, "rtol": 1e-10},
        torch.float32: {"atol": 2e-5, "rtol": 1e-4}}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_equals_the_torch_forward(config, dtype):
    model = make(config, dtype)
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 61, (2, 40), generator=gen)
    tol = TOLS[dtype]
    with torch.no_grad():
        model.backend = "torch"
        _, cache = model(tokens[:, :25])
    # a prefill of a few tokens from an empty cache (causal), with hidden states
    assert_results_close(*both(model, tokens[:, :7], return_hidden=True), tol)
    # a longer prefill: 2 x 40 = 80 rows, several of the panel kernel's 14-row groups
    assert_results_close(*both(model, tokens, logits_to_keep=5), tol)
    # one token, then a chain, with a cache (batch of 2)
    assert_results_close(*both(model, tokens[:, 25:26], cache), tol)
    assert_results_close(*both(model, tokens[:, 25:34], cache, logits_to_keep=3), tol)
    # a draft tree: ancestor mask and positions, per batch row
    mask = torch.ones(2, 4, 29, dtype=torch.bool)
    mask[:, :, 25:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]],
                                   dtype=torch.bool)
    mask[1, :, :3] = False  # row 1: left padding the mask hides
    positions = 25 + torch.tensor([[0, 1, 1, 2]])
    assert_results_close(*both(model, tokens[:, 25:29], cache, position_ids=positions,
                               attention_mask=mask), tol)


def test_a_tokens_logits_are_bitwise_the_same_alone_or_in_a_tree():
    """Greedy steps (one token per call, each call continuing the compiled path's own cache)
    against one verify of a tree holding those tokens among siblings, and a chain."""
    model = make("gqa_small_heads", seed=3)
    gen = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 61, (1, 30), generator=gen)
    a, b, c, x, y = 5, 17, 33, 40, 2
    with torch.no_grad():
        _, cache = model(prompt)  # a prefill of 30 tokens: one compiled call from an empty cache
        steps, c_step = [], cache
        for tok in (a, b, c):
            logits, c_step = model(torch.tensor([[tok]]), c_step)
            steps.append(logits[0, -1])
        # BFS tree: 0=a, 1=x (child of 0), 2=b (child of 0), 3=y (child of 1), 4=c (child of 2)
        tree = torch.tensor([[a, x, b, y, c]])
        parents = [-1, 0, 0, 1, 2]
        mask = torch.zeros(1, 5, 35, dtype=torch.bool)
        mask[:, :, :30] = True
        depth = []
        for i, p in enumerate(parents):
            node, d = i, 0
            while node >= 0:
                mask[0, i, 30 + node] = True
                node, d = parents[node], d + 1
            depth.append(d - 1)
        logits, _ = model(tree, cache, position_ids=30 + torch.tensor([depth]),
                          attention_mask=mask)
        chain, _ = model(torch.tensor([[a, b, c]]), cache)
    for got, want in ((logits[0, 0], steps[0]), (logits[0, 2], steps[1]),
                      (logits[0, 4], steps[2])):
        assert torch.equal(got, want)
    for i in range(3):
        assert torch.equal(chain[0, i], steps[i])
    # the torch forward is close, not bitwise (BLAS and SDPA group their sums by call shape)
    model.backend = "torch"
    with torch.no_grad():
        ref, _ = model(torch.tensor([[a, b, c]]), cache)
    torch.testing.assert_close(chain, ref, atol=2e-5, rtol=1e-4)


def test_caches_cross_between_the_two_forwards():
    """The compiled path returns keys in its transposed layout; the torch forward, crop and
    compaction take them, and the compiled path takes the torch forward's."""
    from recurra.models.transformer_lm import compact_cache, crop_cache

    model = make("mha_vector_heads", torch.float64, seed=5)
    tokens = torch.randint(0, 61, (1, 20), generator=torch.Generator().manual_seed(6))
    tol = TOLS[torch.float64]
    with torch.no_grad():
        model.backend = "torch"
        _, ref_cache = model(tokens[:, :12])
        ref, ref_cache = model(tokens[:, 12:16], ref_cache)
        ref2, _ = model(tokens[:, 16:18], ref_cache)
        model.backend = "auto"
        _, cache = model(tokens[:, :12])
        k = cache[0][0]
        assert k.shape == (1, 2, 12, 32) and k.stride(2) == 1  # transposed storage
        got, cache = model(tokens[:, 12:16], cache)
        model.backend = "torch"
        got2, _ = model(tokens[:, 16:18], cache)  # torch forward on the compiled cache
        model.backend = "auto"
        # a cropped, then a compacted (standard layout) cache into the compiled path
        again, _ = model(tokens[:, 16:18], crop_cache(cache, 16))
        compacted = compact_cache(cache, 12, [0, 1, 2, 3])
        again2, _ = model(tokens[:, 16:18], compacted)
    torch.testing.assert_close(got, ref, **tol)
    torch.testing.assert_close(got2, ref2, **tol)
    torch.testing.assert_close(again, ref2, **tol)
    torch.testing.assert_close(again2, ref2, **tol)


def test_which_calls_take_the_compiled_path(monkeypatch):
    model = make("gqa_small_heads")
    calls = []
    real = llama_decode.llama_decode
    monkeypatch.setattr(llama_decode, "llama_decode",
                        lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    tokens = torch.randint(0, 61, (1, llama_decode.MAX_ROWS + 1))
    with torch.no_grad():
        model(tokens[:, :4])
        model(tokens[:, :-1])  # MAX_ROWS rows (a short prefill): compiled
        model(tokens)  # more rows than MAX_ROWS: the torch forward
        model.backend = "torch"
        model(tokens[:, :4])
        model.backend = "auto"
    assert calls == [torch.Size([1, 4, 48]), torch.Size([1, llama_decode.MAX_ROWS, 48])]
    del calls[1]
    # grad mode with trainable weights: the torch forward, and gradients flow
    logits, _ = model(tokens[:, :4])
    assert len(calls) == 1 and logits.requires_grad
    logits.sum().backward()
    assert model.blocks[0].qkv.grad.abs().sum() > 0
    # frozen weights in grad mode: nothing needs a gradient, so the compiled path serves
    for p in model.parameters():
        p.requires_grad_(False)
    model(tokens[:, :4])
    assert len(calls) == 2
    with pytest.raises(ValueError, match="backend"):
        model.backend = "mkl"


def test_speculative_decoding_through_the_compiled_path_equals_greedy():
    from recurra.decode import generate

    model = make("gqa_small_heads", seed=7)
    prompt = torch.randint(0, 61, (1, 12), generator=torch.Generator().manual_seed(8))
    plain = generate(model, prompt, 40).tokens
    for spec in ("token_recycling", "prompt_lookup", "aded"):
        out = generate(model, prompt, 40, speculative=spec)
        assert torch.equal(out.tokens, plain), spec


def test_cache_helpers_keep_the_transposed_key_layout():
    """Cropping and beam reordering keep the compiled path's key layout, so the next compiled
    call copies rows instead of transposing the whole cache (compaction returns the usual
    layout, which the compiled path takes too: test_caches_cross_between_the_two_forwards)."""
    from recurra.models.transformer_lm import compact_cache, crop_cache, reorder_cache

    model = make("mha_vector_heads", seed=9)
    tokens = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        _, cache = model(tokens)
    k = cache[0][0]
    for out in (reorder_cache(cache, torch.tensor([1, 1, 0])), crop_cache(cache, 7)):
        assert out[0][0].stride(2) == 1 and out[0][1].stride(3) == 1
    torch.testing.assert_close(compact_cache(cache, 6, [1, 3])[0][0],
                               torch.cat((k[:, :, :6], k[:, :, [7, 9]]), dim=2), atol=0, rtol=0)
    torch.testing.assert_close(reorder_cache(cache, torch.tensor([1, 1, 0]))[0][0],
                               k[[1, 1, 0]], atol=0, rtol=0)


def test_the_op_rejects_a_cache_or_weights_of_the_wrong_shape():
    model = make("gqa_small_heads")
    tokens = torch.randint(0, 61, (1, 6))
    with torch.no_grad():
        _, cache = model(tokens[:, :5])
        x = model.embedding(tokens[:, 5:])
        pos = torch.tensor([[5]])
        args = (x, model.rope_cos[pos], model.rope_sin[pos], None)
        weights = model._compiled_weights()
        bad_cache = tuple((k[:, :1], v[:, :1]) for k, v in cache)  # one kv head, not two
        with pytest.raises(RuntimeError, match="cache tensors must be"):
            llama_decode.llama_decode(*args, bad_cache, weights, 6, 2, 1e-5)
        with pytest.raises(RuntimeError, match="n_kv_heads must divide"):
            llama_decode.llama_decode(*args, cache, weights, 6, 4, 1e-5)
        swapped = weights._replace(weights=[weights.weights[2], weights.weights[1]]
                                   + weights.weights[:1] + weights.weights[3:])
        with pytest.raises(RuntimeError, match="weight 0 of layer 0"):
            llama_decode.llama_decode(*args, cache, swapped, 6, 2, 1e-5)
        logits, _ = llama_decode.llama_decode(*args, cache, weights, 6, 2, 1e-5)
    assert logits.shape == (1, 1, 61)
