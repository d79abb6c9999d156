"""Speculative sampling follows the target distribution exactly.

- Recursive rejection sampling, by exact enumeration (no Monte Carlo): for every ordered draw
  without replacement of k <= 3 drafts from q (Plackett-Luce probabilities), the law of the
  emitted token, summed over draws, equals p to 1e-12.
- End to end: a chi-square test of the sequences sampled by each speculative method against the
  exact sequence distribution of a toy recurrent model (enumerated); a deliberately biased
  acceptance rule must fail the same test.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from decode_models import TinyRecurrentLM, single_thread, tiny_transformer  # noqa: F401

from recurra.decode import generate
from recurra.decode.rejection import always_accept, rrs_distribution, rrs_plan


def plackett_luce(q, order):
    prob, left = 1.0, 1.0
    for x in order:
        prob *= float(q[x]) / left
        left -= float(q[x])
    return prob


@pytest.mark.parametrize("vocab", [2, 3, 5, 6])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_rrs_exact_enumeration(vocab, k):
    if k > vocab:
        pytest.skip("k <= vocab")
    g = torch.Generator().manual_seed(vocab * 10 + k)
    for trial in range(6):
        p = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, 0)
        q = torch.softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, 0)
        if trial == 0:
            q = p.clone()  # identical proposal: everything accepted
        if trial == 1 and vocab > 2:
            p[0] = 0.0  # the target forbids a token the draft likes
            p /= p.sum()
        total = torch.zeros(vocab, dtype=torch.float64)
        mass = 0.0
        for order in itertools.permutations(range(vocab), k):
            w = plackett_luce(q, order)
            mass += w
            total += w * rrs_distribution(p, q, list(order))
        assert abs(mass - 1) < 1e-12
        assert (total - p).abs().max() < 1e-12


def test_rrs_negative_control_is_detected():
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.7], dtype=torch.float64)
    # accepting the draft always emits x_1 ~ q: the enumeration sees it
    total = sum(plackett_luce(q, (x,)) * torch.nn.functional.one_hot(torch.tensor(x), 3)
                for x in range(3))
    assert (total.double() - p).abs().max() > 0.1
    accept, _ = rrs_plan(p, q, [2])
    assert accept[0] == pytest.approx(0.1 / 0.7)


# ------------------------------------------------------------------ end-to-end chi-square
V, H = 4, 3


@pytest.fixture(scope="module")
def toy():
    target = TinyRecurrentLM(V, d=8, seed=3)
    draft = TinyRecurrentLM(V, d=8, seed=4)
    return target, draft


def exact_law(model, prompt, temperature):
    law = {}
    for seq in itertools.product(range(V), repeat=H):
        state, logits = None, None
        prob = 1.0
        tokens = list(prompt) + list(seq)
        with torch.no_grad():
            out, state = model(torch.tensor([tokens[:len(prompt)]]))
            logits = out[0, -1]
            for t in seq:
                p = torch.softmax(logits / temperature, -1)
                prob *= float(p[t])
                out, state = model.step(torch.tensor([t]), state)
                logits = out[0]
        law[seq] = prob
    return law


def chi_square_rejects(counts, law, n):
    stat = sum((counts.get(s, 0) - n * p) ** 2 / (n * p) for s, p in law.items())
    df = len(law) - 1
    z = 3.09  # upper 1e-3 quantile of N(0, 1); Wilson-Hilferty approximation of chi2
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat > critical, stat, critical


def sample_counts(model, n, seed, **kw):
    g = torch.Generator().manual_seed(seed)
    counts = {}
    for _ in range(n):
        out = generate(model, torch.tensor([[1, 2]]), H, strategy="sample", temperature=1.5,
                       generator=g, **kw).tokens[0].tolist()
        counts[tuple(out)] = counts.get(tuple(out), 0) + 1
    return counts


METHODS = {
    "token_recycling": {"speculative": "token_recycling"},
    "draft": {"speculative": "draft", "speculative_options": {"num_draft": 2}},
    "rsd_gumbel": {"speculative": "rsd", "speculative_options": {"branching": (2, 2)}},
    "rsd_beam": {"speculative": "rsd", "speculative_options": {"branching": (2, 2),
                                                              "tree": "beam",
                                                              "beam_width": 3}},
}


@pytest.mark.parametrize("method", [
    "token_recycling",
    *[pytest.param(m, marks=pytest.mark.slow) for m in ("draft", "rsd_gumbel", "rsd_beam")]])
def test_end_to_end_sampling_matches_exact_law(toy, method):
    target, draft = toy
    law = exact_law(target, [1, 2], 1.5)
    n = 2500 if method != "token_recycling" else 1500
    kw = dict(METHODS[method])
    if kw["speculative"] in ("draft", "rsd"):
        kw["draft_model"] = draft
    counts = sample_counts(target, n, seed=7, **kw)
    rejects, stat, critical = chi_square_rejects(counts, law, n)
    assert not rejects, (method, stat, critical)


def test_end_to_end_biased_verifier_fails(toy):
    target, draft = toy
    law = exact_law(target, [1, 2], 1.5)
    n = 800
    counts = sample_counts(target, n, seed=7, speculative="draft", draft_model=draft,
                           speculative_options={"num_draft": 2, "rejection": always_accept})
    rejects, stat, critical = chi_square_rejects(counts, law, n)
    assert rejects, (stat, critical)


@pytest.mark.parametrize("method", ["draft", "rsd_gumbel", "rsd_beam"])
def test_draft_model_greedy_is_bit_identical(method):
    target = tiny_transformer(23, seed=0)
    draft = tiny_transformer(23, seed=1)
    kw = dict(METHODS[method])
    for seed in range(3):
        ids = torch.randint(0, 23, (1, 6 + seed), generator=torch.Generator().manual_seed(seed))
        ref = generate(target, ids, 20, repetition_penalty=1.3).tokens
        out = generate(target, ids, 20, repetition_penalty=1.3, draft_model=draft, **kw)
        assert out.tokens.tolist() == ref.tolist()
        # the target as its own draft: everything is accepted
        out = generate(target, ids, 20, repetition_penalty=1.3, draft_model=target, **kw)
        assert out.tokens.tolist() == ref.tolist()
        assert out.stats.mean_accepted > 2.5
