"""Token Recycling's additions: the prefill warm start, the template size chosen from a cost
table, hindsight acceptance estimates and the adaptive tree size (which must never change the
output). Dynamic trees: tests/test_decode_token_recycling_dynamic.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from decode_models import single_thread, tiny_llama, tiny_transformer  # noqa: F401

from recurra.decode import TreeTemplate, generate
from recurra.decode.cost_model import VerifyCost
from recurra.decode.token_recycling import TokenRecycling, choose_size, expected_tokens

V = 23
SMALL = TreeTemplate.best_first(8, (0.5, 0.2, 0.1))  # ranks 0-2: k >= 3


def test_prime_sets_rows_from_prompt_logits_latest_occurrence_wins():
    prompt = [3, 5, 3, 7, 5, 9]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(prompt) - 1, V, generator=g, dtype=torch.float64)
    tr = TokenRecycling(k=4, template=SMALL)
    tr.start(prompt, V)
    tr.prime(prompt, logits)
    expected = np.zeros((V, 4), dtype=np.int64)
    for i in range(len(prompt) - 1):  # a plain loop: later positions overwrite earlier ones
        order = sorted(range(V), key=lambda v: -float(logits[i, v]))
        expected[prompt[i]] = order[:4]
    assert (tr.matrix == expected).all()
    assert tr.matrix[3].tolist() == expected[3].tolist() != [0, 0, 0, 0]


@pytest.mark.parametrize("make", [tiny_transformer, tiny_llama])
def test_warm_start_uses_the_prefill_logits_of_every_prompt_position(make):
    model = make(V)
    prompt = [4, 9, 4, 13, 2, 17, 6]
    tr = TokenRecycling(k=3, template=SMALL)
    # one new token: the tree is the root alone, whose row (prompt[-1]) the update overwrites
    generate(model, [prompt], 1, speculative=tr)
    with torch.no_grad():
        out = model(torch.tensor([prompt[:-1]]))
        logits = (out.logits if hasattr(out, "logits") else out[0])[0]
    for i, t in enumerate(prompt[:-1]):
        if t == prompt[-1] or t in prompt[i + 1:-1]:
            continue  # overwritten by a later position or by the step's update
        assert tr.matrix[t].tolist() == logits[i].topk(3).indices.tolist(), (i, t)
    cold = TokenRecycling(k=3, template=SMALL, warm_start=False)
    generate(model, [prompt], 1, speculative=cold)
    assert (cold.matrix[prompt[0]] == 0).all()


def brute_force_size(cost, acceptance, sizes):
    best, best_gain = 1, 1.0
    for n in sizes:
        if n < 2:
            continue
        # every prefix-closed set of n - 1 nodes is a subset; the best one takes the largest
        gain = max((1 + sum(c)) for c in itertools.combinations(acceptance, n - 1)) \
            / cost.effective(n)
        if gain > best_gain:
            best, best_gain = n, gain
    return best


def test_choose_size_matches_brute_force_on_given_cost_tables():
    tables = [
        {1: 1.0, 2: 1.61, 3: 1.99, 4: 1.60, 8: 1.62, 11: 2.14, 16: 1.95},   # the saw-tooth
        {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0},                                  # linear: never pays
        {1: 1.0, 2: 1.05, 4: 1.1, 8: 1.2, 16: 1.4},                        # almost free
    ]
    rng = np.random.default_rng(0)
    for table in tables:
        cost = VerifyCost(table)
        sizes = [s for s in cost.padded_sizes() if s <= 9]
        for _ in range(20):
            acceptance = list(np.sort(rng.uniform(0, 0.9, size=8))[::-1] ** rng.uniform(1, 4))
            assert choose_size(cost, acceptance, sizes) == brute_force_size(
                cost, acceptance, sizes)
    linear = VerifyCost(tables[1])
    assert choose_size(linear, [0.9] * 8) == 1
    free = VerifyCost(tables[2])
    assert choose_size(free, [0.5] * 15) == 16
    assert choose_size(free, [0.0] * 15) == 1
    assert expected_tokens([0.2, 0.5]).tolist() == [1.0, 1.5, 1.7]


def test_hits_follow_the_first_matching_child():
    t = TreeTemplate([(), (0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    tr = TokenRecycling(k=2, template=t, adaptive=False)
    tokens = np.array([1, 5, 5, 7, 8, 9, 4])  # nodes 1 and 2 both carry 5: node 1 counts
    assert tr.hits(tokens, [5, 7, 4]) == [1, 3, 6]
    assert tr.hits(tokens, [5, 8, 4]) == [1, 4]
    assert tr.hits(tokens, [6, 7, 4]) == []


def test_hindsight_estimates_follow_the_emitted_tokens():
    t = TreeTemplate([(), (0,), (1,), (0, 0)])
    tr = TokenRecycling(k=2, template=t, cost=VerifyCost({1: 1.0, 2: 1.0, 4: 1.0}),
                        smoothing=0.5)
    tr.start([1], 10)
    tr.matrix[1] = [2, 3]
    tr.matrix[2] = [4, 5]
    prior = tr.acceptance.copy()
    tr.draft([0, 1], 5)                    # pending: root 1 at position 2
    tr.draft([0, 1, 2], 5)                 # one token known: depth 2 needs two
    assert (tr.acceptance == prior).all()
    tr.draft([0, 1, 2, 4], 5)              # 1 -> 2 -> 4: nodes 1 and 3 were right
    expected = prior * 0.5 + 0.5 * np.array([1, 1, 0, 1])
    expected[0] = 1.0
    assert np.allclose(tr.acceptance, expected)


def test_adaptive_size_shrinks_to_plain_steps_and_never_changes_the_output():
    model = tiny_llama(V)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, 12), generator=g)
    ref = generate(model, ids, 40, repetition_penalty=1.2).tokens[0].tolist()
    # trees cost as much as their tokens: never worth it, every step is a plain step
    linear = VerifyCost({1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0, 16: 16.0, 32: 32.0})
    tr = TokenRecycling(cost=linear)
    out = generate(model, ids, 40, repetition_penalty=1.2, speculative=tr)
    assert out.tokens[0].tolist() == ref
    assert out.stats.verified_tokens == out.stats.steps == 40
    # trees nearly free: big trees, still the same output
    free = VerifyCost({1: 1.0, 2: 1.01, 4: 1.02, 8: 1.03, 16: 1.04, 32: 1.05})
    tr = TokenRecycling(cost=free)
    for _ in range(2):
        out = generate(model, ids, 40, repetition_penalty=1.2, speculative=tr)
        assert out.tokens[0].tolist() == ref
    assert out.stats.verified_tokens > 4 * out.stats.steps
    assert max(tr.sizes_used) > 8
    # a useless matrix (rows of tokens the output never holds) drives the estimates down
    # until plain steps win
    saw = VerifyCost({1: 1.0, 2: 1.61, 3: 1.99, 4: 1.60, 8: 1.62, 16: 1.95, 32: 2.77})
    tr = TokenRecycling(cost=saw, tree="template", warm_start=False, smoothing=0.3)
    assert len(tr.active_nodes()) > 1  # the prior favours a tree
    tr.start([0], V)
    never = [t for t in range(V) if t not in ref]
    tr.matrix[:] = np.resize(never, tr.matrix.shape[1])
    tr.update = lambda *a: None  # keep the matrix useless
    out = generate(model, ids, 40, repetition_penalty=1.2, speculative=tr)
    assert out.tokens[0].tolist() == ref
    assert tr.active_nodes().tolist() == [0]
    assert out.stats.verified_tokens < 2 * out.stats.steps  # it shrank within the call


def test_measure_times_chains_and_trees():
    from recurra.decode.cost_model import measure
    from recurra.decode.protocol import as_adapter

    adapter = as_adapter(tiny_llama(V))
    context = [int(t) for t in torch.randint(0, V, (12,), generator=torch.Generator())]
    for tree in (False, True):
        cost = measure(adapter, context, sizes=(1, 2, 4), repeats=1, tree=tree)
        assert list(cost.table) == [1, 2, 4] and cost.table[1] == 1.0
        assert all(v > 0 for v in cost.table.values())
    with pytest.raises(ValueError, match="context"):
        measure(adapter, context[:3], sizes=(1, 8))
    with pytest.raises(ValueError, match="repeats"):
        measure(adapter, context, sizes=(1, 2), repeats=0)


def test_measure_pairs_cancel_a_drifting_machine():
    """A fake session whose verify of k tokens takes cost[k] x the machine's speed factor of the
    moment; the factor changes between pairs of calls (a VM's slow moments). The paired
    measurement recovers the true relative costs exactly."""
    from recurra.decode.cost_model import measure

    cost = {1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5}
    now = [0.0]

    class Session:
        calls = 0

        def append(self, tokens, logits_to_keep=0):
            pass

        def verify(self, tree):
            # slow (x1.5) every third pair of calls, and slower still (x2) every fifth
            pair = Session.calls // 2
            speed = 2.0 if pair % 5 == 0 else 1.5 if pair % 3 == 0 else 1.0
            now[0] += cost[len(tree)] * speed
            Session.calls += 1

        def commit(self, path):
            assert path == []

    class Adapter:
        device = torch.device("cpu")

        def new_session(self):
            return Session()

    got = measure(Adapter(), list(range(12)), sizes=(8, 2, 4), repeats=4,
                  clock=lambda: now[0])
    assert got.table == pytest.approx(cost, rel=1e-12)
