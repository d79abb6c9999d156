"""Speculative decoding is lossless: bit-identical to plain greedy (float64, CPU), and token-
identical to plain sampling under the same seed (sample-and-match draws one uniform per emitted
token), for a recurrent LM, our TransformerLM and a tiny random transformers Llama."""

from __future__ import annotations

import random

import pytest
import torch
from decode_models import TinyRecurrentLM, single_thread, tiny_llama, tiny_transformer  # noqa: F401

from recurra.decode import Drafter, DraftTree, generate
from recurra.decode.aded import ADED
from recurra.decode.prompt_lookup import PromptLookup
from recurra.decode.recurrent_adapter import RecurrentAdapter
from recurra.decode.token_recycling import TokenRecycling

V = 23


class OracleDrafter(Drafter):
    """Drafts the true continuation (given), as a chain or with wrong siblings at every level."""

    def __init__(self, prompt, continuation, depth=5, tree=False):
        self.full = list(prompt) + list(continuation)
        self.depth, self.tree = depth, tree

    def draft(self, history, max_depth):
        n = len(history)
        true = self.full[n:n + min(self.depth, max_depth)]
        if not self.tree:
            return DraftTree.chain(history[-1], true)
        tokens, parents, parent = [history[-1]], [-1], 0
        for t in true:  # a wrong sibling first, then the true token, which continues
            tokens += [(t + 1) % V, t]
            parents += [parent, parent]
            parent = len(tokens) - 1
        return DraftTree(tokens, parents)


class RandomDrafter(Drafter):
    """Random (almost always wrong) trees of random shapes."""

    def __init__(self, seed=0):
        self.rng = random.Random(seed)

    def draft(self, history, max_depth):
        n = self.rng.randint(1, 9)
        tokens, parents = [history[-1]], [-1]
        for i in range(1, n):
            tokens.append(self.rng.randrange(V))
            parents.append(self.rng.randrange(i))
        return DraftTree(tokens, parents)


def recurrent_lm():
    """The project's RecurrentLM (LSTM blocks), sharpened so greedy outputs vary."""
    from recurra.models import RecurrentLM

    torch.manual_seed(0)
    model = RecurrentLM(V, 16, 2, layer="lstm", tie_weights=False).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.8)
    return model


def models():
    rec = TinyRecurrentLM(V)
    return {
        "recurrent-lm": recurrent_lm(),
        "recurrent-levels": rec,
        "recurrent-unroll": RecurrentAdapter(rec, mode="unroll"),
        "transformer": tiny_transformer(V),
        "llama": tiny_llama(V),
    }


MODELS = models()
PROCESSOR_SETS = [{}, {"repetition_penalty": 1.3, "no_repeat_ngram_size": 3},
                  {"presence_penalty": 0.5, "frequency_penalty": 0.3}]


def prompt(seed, length=10):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (1, length), generator=g)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("procs", range(len(PROCESSOR_SETS)))
def test_greedy_speculative_bit_identical(name, procs):
    model = MODELS[name]
    kw = PROCESSOR_SETS[procs]
    for seed in range(3):
        ids = prompt(seed, 4 + 5 * seed)
        ref = generate(model, ids, 30, **kw).tokens[0].tolist()
        cont = ref
        drafters = ["prompt_lookup", "token_recycling", "aded", Drafter(), RandomDrafter(seed),
                    TokenRecycling(template_size=6, lookup=4), ADED(cost=None),
                    PromptLookup(adaptive=False, min_ngram=1, num_draft=10, latest=False),
                    OracleDrafter(ids[0].tolist(), cont), OracleDrafter(ids[0].tolist(), cont,
                                                                        depth=3, tree=True)]
        for d in drafters:
            out = generate(model, ids, 30, speculative=d, **kw)
            assert out.tokens[0].tolist() == ref, (name, d, kw)
        # the oracle is always right: every step emits depth + 1 tokens (but the last)
        out = generate(model, ids, 30, speculative=OracleDrafter(ids[0].tolist(), cont), **kw)
        assert out.stats.steps == 5  # 30 tokens / 6 per step


@pytest.mark.parametrize("name", list(MODELS))
def test_eos_inside_draft_and_budget_edges(name):
    model = MODELS[name]
    ids = prompt(7, 9)
    ref = generate(model, ids, 25, repetition_penalty=1.5).tokens[0].tolist()
    eos = ref[6]
    cut = ref[:ref.index(eos) + 1]
    oracle = OracleDrafter(ids[0].tolist(), ref, depth=8)  # drafts through the EOS
    for spec in [None, "prompt_lookup", "token_recycling", oracle, RandomDrafter(3)]:
        out = generate(model, ids, 25, repetition_penalty=1.5, eos_token_id=eos,
                       speculative=spec)
        assert out.tokens[0].tolist() == cut, spec
    for n in (0, 1, 2, 3):
        ref_n = generate(model, ids, n, repetition_penalty=1.5).tokens[0].tolist()
        assert ref_n == ref[:n]
        for spec in ["token_recycling", oracle, RandomDrafter(5)]:
            out = generate(model, ids, n, repetition_penalty=1.5, speculative=spec)
            assert out.tokens[0].tolist() == ref[:n], (n, spec)


@pytest.mark.parametrize("name", list(MODELS))
def test_sampling_speculative_reproduces_plain_sampling(name):
    model = MODELS[name]
    ids = prompt(11, 12)
    kw = {"strategy": "sample", "temperature": 0.9, "top_k": 12, "top_p": 0.95, "repetition_penalty": 1.1}
    for seed in range(3):
        ref = generate(model, ids, 30, seed=seed, **kw).tokens[0].tolist()
        full = ids[0].tolist() + ref
        for spec in ["prompt_lookup", "token_recycling", "aded", RandomDrafter(seed),
                     OracleDrafter(ids[0].tolist(), ref, tree=True)]:
            out = generate(model, ids, 30, seed=seed, speculative=spec, **kw)
            assert out.tokens[0].tolist() == ref, (spec, seed)
        assert len(full) == 42


def test_token_recycling_matrix_persists_across_calls():
    model = MODELS["transformer"]
    ids = prompt(3, 10)
    first = generate(model, ids, 30, speculative="token_recycling",
                     speculative_options={"template_size": 12})
    second = generate(model, ids, 30, speculative="token_recycling",
                      speculative_options={"template_size": 12})
    assert first.tokens.tolist() == second.tokens.tolist()
    assert second.stats.steps < first.stats.steps  # hot start: the matrix remembers


def test_batch_greedy_matches_rows():
    model = MODELS["transformer"]
    ids = torch.cat([prompt(s, 8) for s in range(3)])
    out = generate(model, ids, 12, repetition_penalty=1.2).tokens
    for r in range(3):
        assert out[r].tolist() == generate(model, ids[r:r + 1], 12,
                                           repetition_penalty=1.2).tokens[0].tolist()
