"""LlamaLM: the port of transformers' LlamaForCausalLM, against transformers itself."""

import pytest
import torch

pytest.importorskip("transformers")

from decode_models import tiny_llama

from recurra.decode import generate
from recurra.models import build_model
from recurra.models.llama import LlamaLM

pytestmark = pytest.mark.usefixtures("one_thread")


def hf_logits(model, ids, cache=None):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config) if cache is None else cache
    with torch.no_grad():
        return model(input_ids=ids, cache=cache, use_cache=True).logits, cache


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
def test_logits_equal_transformers_prefill_and_incremental(dtype, tol):
    # float64: transformers' RMSNorm rounds to float32, ours does not (hence 1e-6, not 1e-12)
    hf = tiny_llama().to(dtype)
    ours = LlamaLM.from_transformers(hf)
    assert ours.embedding.weight.dtype == dtype
    ids = torch.randint(0, 23, (2, 17), generator=torch.Generator().manual_seed(0))
    want, cache = hf_logits(hf, ids[:, :10])
    want2, _ = hf_logits(hf, ids[:, 10:], cache)
    with torch.no_grad():
        got, ours_cache = ours(ids[:, :10])
        got2, ours_cache = ours(ids[:, 10:], ours_cache)
        whole, _ = ours(ids)
    scale = want.abs().max()
    torch.testing.assert_close(got, want, atol=tol * scale, rtol=0)
    torch.testing.assert_close(got2, want2, atol=tol * scale, rtol=0)
    torch.testing.assert_close(torch.cat((got, got2), 1), whole, atol=1e-10 * scale
                               if dtype == torch.float64 else 1e-4 * scale, rtol=0)
    assert ours_cache[0][0].shape == (2, 2, 17, 8)  # (B, kv heads, S, head dim)


def test_tree_mask_and_positions_equal_separate_branches():
    """Two branches verified in one pass (ancestor mask, positions L + depth) give each
    branch's logits computed on its own."""
    ours = LlamaLM.from_transformers(tiny_llama())
    prefix = torch.tensor([[3, 5, 7, 11]])
    with torch.no_grad():
        _, cache = ours(prefix)
        a, _ = ours(torch.tensor([[4, 6]]), cache)               # branch 1: 4 -> 6
        b, _ = ours(torch.tensor([[9]]), cache)                  # branch 2: 9
        mask = torch.ones(1, 3, 7, dtype=torch.bool)
        mask[0, :, 4:] = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
        tree, _ = ours(torch.tensor([[4, 6, 9]]), cache, position_ids=torch.tensor([4, 5, 4]),
                       attention_mask=mask)
    torch.testing.assert_close(tree[:, :2], a, atol=1e-10, rtol=0)
    torch.testing.assert_close(tree[:, 2:], b, atol=1e-10, rtol=0)


@pytest.mark.parametrize("speculative", [None, "prompt_lookup", "token_recycling", "aded"])
def test_decoding_gives_transformers_outputs(speculative):
    hf = tiny_llama()
    ours = LlamaLM.from_transformers(hf)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        prompt = torch.randint(3, 23, (1, 9), generator=gen)
        want = generate(hf, prompt, 30, speculative=speculative).tokens
        got = generate(ours, prompt, 30, speculative=speculative).tokens
        assert torch.equal(got, want)


def test_beam_search_gives_transformers_beam_output():
    hf = tiny_llama()
    ours = LlamaLM.from_transformers(hf)
    prompt = torch.tensor([[5, 9, 4, 12, 7]])
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, num_beams=4, do_sample=False,
                           eos_token_id=None, pad_token_id=0)[0, 5:]
    got = generate(ours, prompt, 12, strategy="beam", num_beams=4).tokens[0]
    assert torch.equal(got, want)


def test_tied_head_and_config_round_trip():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=19, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1,
                      max_position_embeddings=64, tie_word_embeddings=True, rope_theta=500.0)
    hf = LlamaForCausalLM(cfg).double().eval()
    ours = LlamaLM.from_transformers(hf)
    assert ours.head is None and ours.config.tie_weights   # (tiny_llama's head is untied)
    ids = torch.randint(0, 19, (1, 8))
    want, _ = hf_logits(hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], want, atol=1e-6, rtol=0)
    rebuilt = build_model(ours.config_dict()).double()
    rebuilt.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(ids)[0], ours(ids)[0], atol=0, rtol=0)


def test_tied_head_follows_the_embedding_and_trains():
    torch.manual_seed(0)
    ours = LlamaLM(23, 32, 2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64).double()
    ids = torch.randint(0, 23, (1, 6))
    with torch.no_grad():
        before = ours(ids)[0]
        ours.embedding.weight[5].mul_(2)                           # in place: version bump
        after = ours(ids)[0]
        hidden = ours(ids, return_hidden=True)[2]
        direct = hidden @ ours.embedding.weight.t()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, direct, atol=1e-10, rtol=0)
    logits, _ = ours(ids)                                           # with gradients
    logits[0, -1, 3].backward()
    assert ours.embedding.weight.grad[3].abs().sum() > 0           # the head's row of token 3


def test_bad_inputs_raise():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(ValueError, match="model_type 'llama'"):
        LlamaLM.from_transformers(type("M", (), {"config": type("C", (), {
            "model_type": "gpt2"})()})())
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1,
                      rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_type 'linear'"):
        LlamaLM.from_transformers(LlamaForCausalLM(cfg))
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaLM(11, 8, 1, n_heads=3, n_kv_heads=2, head_dim=4, intermediate_size=8)
    ours = LlamaLM(11, 8, 1, n_heads=2, n_kv_heads=1, head_dim=4, intermediate_size=8)
    with pytest.raises(ValueError, match=r"cache tensors must have shape \(1, 1, S, 4\)"):
        ours(torch.tensor([[1]]), ((torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)),))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 10\]"):
        ours(torch.tensor([[11]]))
