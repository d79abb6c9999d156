"""Drafters' own behaviour, conditional beam search, RPG, JRT-Prompt, cost model."""

from __future__ import annotations

import torch
from decode_models import single_thread, tiny_transformer  # noqa: F401

from recurra.decode import TreeTemplate, generate
from recurra.decode.aded import ADED
from recurra.decode.conditional_beam import (
    AttributeClassifier,
    is_degenerate,
    repeated_ngram_fraction,
    train_nondegenerate_classifier,
)
from recurra.decode.cost_model import CPU_2CORE_SMOLLM2, VerifyCost
from recurra.decode.jrt_prompt import jrt_prompt
from recurra.decode.prompt_lookup import PromptLookup
from recurra.decode.rpg import GrammarRepetitionPenalty, grammar_symbols, tandem_repeat
from recurra.decode.token_recycling import TokenRecycling


def test_prompt_lookup_drafts_latest_and_first_match():
    history = [5, 6, 7, 1, 5, 6, 8, 2, 9, 5, 6]
    latest = PromptLookup(max_ngram=2, min_ngram=2, num_draft=3, adaptive=False)
    latest.start(history, 20)
    assert latest.draft(history, 10).tokens == [6, 8, 2, 9]
    first = PromptLookup(max_ngram=2, min_ngram=1, num_draft=3, adaptive=False, latest=False)
    first.start(history, 20)
    assert first.draft(history, 10).tokens == [6, 7, 1, 5]
    assert first.draft(history, 1).tokens == [6, 7]  # depth limited by the budget
    assert latest.draft([1, 2, 3, 4], 5).tokens == [4]  # no match: no draft


def test_prompt_lookup_adaptive_length_follows_cost_and_acceptance():
    pl = PromptLookup(num_draft=15, cost=CPU_2CORE_SMOLLM2, prior=0.9)
    pl.start([], 10)
    long_ = pl._draft_length(2)
    pl.acceptance[2] = 0.05
    assert long_ > 3 and pl._draft_length(2) == 0  # hopeless matches are not drafted


def test_best_first_template_and_token_recycling_fill():
    t = TreeTemplate.best_first(6, rank_acceptance=(0.5, 0.2), max_depth=3)
    assert t.paths == [(), (0,), (1,), (0, 0), (0, 1), (0, 0, 0)]
    assert t.parents == [-1, 0, 0, 1, 1, 3]
    tr = TokenRecycling(k=2, template=t, adaptive=False)
    tr.start([], 10)
    tr.matrix[3] = [4, 5]
    tr.matrix[4] = [6, 7]
    tr.matrix[6] = [8, 9]
    tree = tr.draft([1, 3], 5)
    assert tree.tokens == [3, 4, 5, 6, 7, 8] and tree.parents == [-1, 0, 0, 1, 1, 3]
    assert tr.draft([1, 3], 1).tokens == [3, 4, 5]  # depth limit
    tr.matrix[4] = [6, 6]  # duplicate siblings are dropped with their subtrees
    assert tr.draft([1, 3], 5).tokens == [3, 4, 5, 6, 8]
    logits = torch.zeros(5, 10)
    logits[0, [7, 2]] = torch.tensor([2.0, 1.0])  # node 0 (token 3): top-2 = 7, 2
    logits[3, [1, 0]] = torch.tensor([2.0, 1.0])  # node 3 (token 6)
    tr.update(tr.draft([1, 3], 5), logits, [0], [7])
    assert tr.matrix[3].tolist() == [7, 2] and tr.matrix[6].tolist() == [1, 0]


def test_aded_table_updates_and_tree():
    a = ADED(cost=None, max_nodes=5, max_depth=3, increment=0.5, cap=1.0)
    a.start([1, 2, 3, 1, 2, 4, 1, 2, 3], 10)
    assert a.table[(1, 2)] == {3: 1.0, 4: 0.5}  # +0.5 twice, capped at 1.0
    tree = a.draft([7, 1, 2], 5)
    assert tree.tokens[:3] == [2, 3, 1] and tree.parents[:3] == [-1, 0, 1]
    assert 4 in tree.tokens  # the second successor of (1, 2) is drafted too
    b = ADED(corpus=[[1, 2, 5, 1, 2, 5, 1, 2, 6]], cost=None)
    assert b.table[(1, 2)] == {5: 2 / 3, 6: 1 / 3}


def test_verify_cost_padding():
    c = VerifyCost({1: 1.0, 2: 1.6, 3: 2.0, 4: 1.6, 8: 1.62})
    sizes = c.padded_sizes()
    assert 2 not in sizes and 3 not in sizes and 4 in sizes and 8 in sizes
    assert c.effective(3) == 1.6


def test_verify_cost_precomputed_answers_equal_their_definitions():
    """effective(k) = the cheapest relative cost of any size >= k (held past the table's end);
    padded_sizes() = the sizes that every larger size costs more than. Checked by brute force
    on random tables."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        sizes = sorted({1, *torch.randint(2, 40, (6,), generator=gen).tolist()})
        costs = (1 + torch.rand(len(sizes), generator=gen) * 4).tolist()
        c = VerifyCost({k: (1.0 if k == 1 else v) for k, v in zip(sizes, costs)})
        top = max(c.table)
        for k in range(1, top + 6):
            want = (min(c.relative(j) for j in range(k, top + 1)) if k <= top
                    else c.relative(k))
            assert c.effective(k) == want
        ks = range(1, top + 1)
        assert c.padded_sizes() == [k for k in ks if all(c.relative(j) > c.relative(k)
                                                         for j in ks if j > k)]


def test_repetition_measures():
    assert repeated_ngram_fraction([1, 2, 3, 4, 5]) == 0.0
    assert repeated_ngram_fraction([1, 2] * 6, n=2) == 9 / 11
    assert is_degenerate([3] * 20) and not is_degenerate(list(range(20)))


def test_conditional_beam_reduces_to_beam_and_classifier_trains():
    model = tiny_transformer(23, seed=2)
    ids = torch.tensor([[3, 4, 5, 6]])
    plain = generate(model, ids, 8, strategy="beam", num_beams=3, num_return_sequences=3)
    clf = AttributeClassifier(32).double()
    torch.nn.init.zeros_(clf.linear.weight)
    torch.nn.init.constant_(clf.linear.bias, 0.3)  # constant attribute: same ranking
    cond = generate(model, ids, 8, strategy="conditional_beam", num_beams=3,
                    num_return_sequences=3, attribute_classifier=clf, attribute_weight=2.0)
    assert cond.tokens.tolist() == plain.tokens.tolist()
    prompts = [[i, i + 1, i + 2] for i in range(4)]
    clf, info = train_nondegenerate_classifier(model, prompts, max_new_tokens=16,
                                               samples_per_prompt=3, steps=200)
    assert info["sequences"] == 16
    if 0 < info["degenerate_fraction"] < 1:
        assert info["prefix_accuracy"] > 0.6
    out = generate(model, ids, 8, strategy="conditional_beam", num_beams=3,
                   attribute_classifier=clf, attribute_weight=5.0)
    assert out.tokens.shape == (1, 8)


VOCAB = ["a", "b", "c", "d", " = ", "1", "2", "3", "\n", "print(", ")", "x"]


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


def test_rpg_grammar_symbols_and_structural_repetition():
    text = decode([0, 4, 5, 8, 1, 4, 6, 8, 2, 4, 7, 8])  # a = 1 / b = 2 / c = 3
    symbols = [s for s, _ in grammar_symbols(text)]
    assert symbols == ["NAME", "=", "NUMBER", "NEWLINE"] * 3
    assert tandem_repeat(symbols, 3, 10, 3) == (4, 3)
    assert grammar_symbols("print((1,") [-1][0] == ","  # an unfinished tail still lexes
    rpg = GrammarRepetitionPenalty(decode, strength=2.0, min_repeats=3)
    rpg.start(0)
    scores = rpg(torch.tensor([[0, 4, 5, 8, 1, 4, 6, 8, 2, 4, 7, 8]]), torch.zeros(1, 12))
    assert scores[0].tolist() == [-2.0, -2.0, -2.0] + [0.0] * 9
    two = rpg(torch.tensor([[0, 4, 5, 8, 1, 4, 6, 8]]), torch.zeros(1, 12))
    assert (two == 0).all()  # two copies: not yet a repetition
    four = rpg(torch.tensor([[0, 4, 5, 8, 1, 4, 6, 8, 2, 4, 7, 8, 3, 4, 5, 8]]),
               torch.zeros(1, 12))
    assert four[0, 0] == -4.0  # decays further with every copy


def test_rpg_processor_keeps_speculative_lossless():
    model = tiny_transformer(12, seed=1)
    rpg = GrammarRepetitionPenalty(decode, strength=3.0, min_repeats=2, min_period=2)
    ids = torch.tensor([[0, 4, 5, 8]])
    ref = generate(model, ids, 24, processors=[rpg]).tokens
    for spec in ("prompt_lookup", "token_recycling"):
        assert generate(model, ids, 24, processors=[rpg], speculative=spec).tokens.tolist() \
            == ref.tolist()


def test_jrt_prompt():
    assert jrt_prompt("ctx", "q?") == "ctx\n\nctx\n\nq?"
    assert jrt_prompt("ctx", repeats=3, separator=" | ") == "ctx | ctx | ctx"
    assert jrt_prompt([1, 2], [9], separator=[0]) == [1, 2, 0, 1, 2, 0, 9]
    assert jrt_prompt([1, 2]) == [1, 2, 1, 2]
    try:
        jrt_prompt("x", repeats=0)
    except ValueError as e:
        assert "repeats" in str(e)
    else:
        raise AssertionError("repeats=0 must raise")


def test_token_recycling_grafts_lookup_chain():
    t = TreeTemplate.best_first(3, rank_acceptance=(0.5, 0.2), max_depth=3)
    tr = TokenRecycling(k=2, template=t, lookup=3, adaptive=False)
    history = [5, 6, 7, 8, 9, 1, 5, 6]
    tr.start(history, 10)
    tr.matrix[6] = [7, 2]
    tree = tr.draft(history, 5)
    # template (0,), (0, 0): 6 -> 7 -> A[7, 0] = 0; lookup copies 7 8 9 after "5 6":
    # 7 is shared, 8 hangs below it, 9 below 8
    assert tree.tokens == [6, 7, 0, 8, 9] and tree.parents == [-1, 0, 1, 1, 3]
