"""Token Recycling's dynamic trees: the calibration, the records, best-first growth (against a
brute-force enumeration of every path), the hindsight trials, copied chains, and sizes that
shrink to plain steps without ever changing the output."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from decode_models import single_thread, tiny_llama  # noqa: F401

from recurra.decode import generate
from recurra.decode.acceptance import (
    CONFIDENCE_BINS,
    NUM_BUCKETS,
    AcceptanceCalibration,
    confidence_bins,
    lookup_bucket,
)
from recurra.decode.cost_model import VerifyCost
from recurra.decode.token_recycling import TokenRecycling, choose_size

V = 23


def plain_bin(p: float) -> int:
    """The confidence bin by a loop over the edges (the oracle of confidence_bins)."""
    b = 0
    for j, edge in enumerate(CONFIDENCE_BINS):
        if p >= edge:
            b = j
    return b


def test_calibration_counts_prior_and_window():
    prior = np.linspace(0.05, 0.9, NUM_BUCKETS)
    cal = AcceptanceCalibration(prior=prior, prior_weight=4.0, window=20.0)
    assert np.allclose(cal.rates(), prior)
    cal.observe(np.array([0, 0, 1]), np.array([True, False, True]))
    expected = prior.copy()
    expected[0] = (1 + 4 * prior[0]) / (2 + 4)
    expected[1] = (1 + 4 * prior[1]) / (1 + 4)
    assert np.allclose(cal.rates(), expected)
    # the window: a loop that scales a bucket's counts to 20 trials whenever they pass 20
    hits, trials = 0.0, 0.0
    for i in range(30):
        hit = i % 3 == 0
        cal.observe(np.array([2]), np.array([hit]))
        hits, trials = hits + hit, trials + 1
        if trials > 20:
            hits, trials = hits * 20 / trials, 20.0
    assert cal.trials[2] == pytest.approx(trials) and cal.hits[2] == pytest.approx(hits)
    assert cal.rates()[2] == pytest.approx((hits + 4 * prior[2]) / (trials + 4))
    cal.reset()
    assert np.allclose(cal.rates(), prior) and not cal.trials.any()
    probs = np.array([0.0, 0.049, 0.05, 0.2999, 0.3, 0.95, 1.0])
    assert confidence_bins(probs).tolist() == [plain_bin(p) for p in probs] == [0, 0, 1, 3, 4, 7, 7]
    with pytest.raises(ValueError, match="prior"):
        AcceptanceCalibration(prior=np.ones(3))
    with pytest.raises(ValueError, match="prior_weight"):
        AcceptanceCalibration(prior_weight=10.0, window=5.0)


def test_records_first_occurrence_wins_and_context_records():
    tr = TokenRecycling(k=2, lookup=0)
    tr.start([0], 10)
    tokens = np.array([4, 5, 4, 6])
    previous = np.array([1, 4, 2, 4])
    before = np.array([0, 1, 3, 1])
    top = np.array([[7, 8], [1, 2], [3, 9], [0, 5]])
    probs = np.array([[0.6, 0.2], [0.5, 0.4], [0.95, 0.01], [0.3, 0.3]], dtype=np.float32)
    tr._store(tokens, previous, before, top, probs)
    assert tr.matrix[4].tolist() == [7, 8] and tr.row_previous[4] == 1  # node 0, not node 2
    assert np.allclose(tr.confidence[4], [0.6, 0.2])
    bins = len(CONFIDENCE_BINS)

    def bucket(context, this_call, p):  # the bucket layout, written out
        return (context * 2 + this_call) * bins + plain_bin(p)

    succ, conf, buckets = tr.successors(4, 2, 3)  # node 2's three-token context
    assert succ.tolist() == [3, 9] and np.allclose(conf, [0.95, 0.01])
    assert buckets.tolist() == [bucket(2, 1, 0.95), bucket(2, 1, 0.01)]
    succ, _, buckets = tr.successors(4, 2, 7)  # its two-token context only
    assert succ.tolist() == [3, 9]
    assert buckets.tolist() == [bucket(1, 1, 0.95), bucket(1, 1, 0.01)]
    succ, _, buckets = tr.successors(4, 3, 0)  # an unseen context: the row, another context
    assert succ.tolist() == [7, 8]
    assert buckets.tolist() == [bucket(0, 1, 0.6), bucket(0, 1, 0.2)]
    assert tr.successors(9, 4, 1) is None  # never recorded
    tr.start([0], 10)  # a new call: the same records now count as earlier ones
    _, _, buckets = tr.successors(4, 2, 3)
    assert buckets.tolist() == [bucket(2, 0, 0.95), bucket(2, 0, 0.01)]


def test_prime_records_probabilities_latest_occurrence_wins():
    prompt = [3, 5, 3, 7, 5, 9]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(len(prompt) - 1, V, generator=g, dtype=torch.float64)
    tr = TokenRecycling(k=4, lookup=0)
    tr.start(prompt, V)
    tr.prime(prompt, logits)
    probs = torch.softmax(logits, -1)
    for i in range(len(prompt) - 1):  # a plain loop: later positions overwrite earlier ones
        order = sorted(range(V), key=lambda v: -float(logits[i, v]))[:4]
        if prompt[i] not in prompt[i + 1:-1]:
            assert tr.matrix[prompt[i]].tolist() == order
            assert np.allclose(tr.confidence[prompt[i]], probs[i, order].numpy(), rtol=5e-5)
            assert tr.row_previous[prompt[i]] == (prompt[i - 1] if i else -1)
        # every two-token context keeps its own successors
        padded = [-1, -1] + prompt
        record = tr.context_rows[(padded[i + 1], prompt[i])]
        assert record[0].tolist() == order
        assert tr.context_rows[(padded[i], padded[i + 1], prompt[i])][0].tolist() == order


def enumerate_paths(root, previous, before, max_depth, rates, this_call, rows, contexts):
    """Every rank path from the root up to max_depth with its path product, by recursion over
    the test's own log of what was recorded (independent of TokenRecycling.successors)."""
    out = []

    def visit(path_tokens, token, previous, before, score, depth):
        if depth == max_depth:
            return
        if (before, previous, token) in contexts:
            succ, probs, call = contexts[(before, previous, token)]
            level = 2
        elif (previous, token) in contexts:
            succ, probs, call = contexts[(previous, token)]
            level = 1
        elif token in rows:
            succ, probs, prev_w, call = rows[token]
            level = int(prev_w == previous)
        else:
            return
        for tok, p in zip(succ, probs):
            b = (level * 2 + int(call == this_call)) * len(CONFIDENCE_BINS) + plain_bin(p)
            s = score * rates[b]
            out.append((tuple(path_tokens + [tok]), s))
            visit(path_tokens + [tok], tok, token, previous, s, depth + 1)

    visit([], root, previous, before, 1.0, 0)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_tree_is_the_best_first_set_of_calibrated_path_products(seed):
    rng = np.random.default_rng(seed)
    k, vocab = 3, 12
    prior = rng.uniform(0.05, 0.95, NUM_BUCKETS)
    tr = TokenRecycling(k=k, lookup=0, adaptive=False, max_nodes=14,
                        calibration=AcceptanceCalibration(prior=prior))
    tr.start([0], vocab)
    rows, contexts = {}, {}
    for call in (1, 2):  # records from an earlier call, then from this one
        tr.calls = call
        for token in rng.choice(vocab, size=8, replace=False):
            succ = rng.choice(vocab, size=k, replace=False)
            probs = np.sort(rng.uniform(0, 1, k))[::-1].astype(np.float32)
            prev, before = (int(t) for t in rng.integers(-1, 4, size=2))  # contexts recur
            tr._store(np.array([token]), np.array([prev]), np.array([before]), succ[None],
                      probs[None])
            record = (succ.tolist(), probs.tolist(), call)
            rows[int(token)] = (succ.tolist(), probs.tolist(), prev, call)
            contexts[(prev, int(token))] = contexts[(before, prev, int(token))] = record
    history = [int(rng.integers(4)), int(rng.integers(4)), int(rng.choice(list(rows)))]
    tree = tr.draft(history, 4)
    paths = enumerate_paths(history[-1], history[-2], history[-3], 4, prior, 2, rows, contexts)
    paths.sort(key=lambda ps: -ps[1])
    expected = {p for p, _ in paths[:len(tree) - 1]}
    got = set()
    for i in range(1, len(tree)):
        got.add(tuple(tree.tokens[j] for j in tree.path_to(i)[1:]))
    assert len(tree) == min(14, len(paths) + 1)
    assert got == expected
    # adaptive: the size choose_size gives for the same ordered products (the growth stops
    # early where no larger tree can win: a steep cost table makes it stop soon)
    for table in ({1: 1.0, 2: 1.1, 4: 1.2, 8: 1.5, 16: 2.5}, {1: 1.0, 2: 1.5, 4: 2.5, 16: 9.0},
                  {1: 1.0, 2: 1.02, 3: 2.0, 16: 2.1}):
        cost = VerifyCost(table)
        tr2 = TokenRecycling(k=k, lookup=0, max_nodes=14, cost=cost,
                             calibration=AcceptanceCalibration(prior=prior))
        tr2.start([0], vocab)
        for attr in ("matrix", "confidence", "_bins", "row_previous", "row_call"):
            setattr(tr2, attr, getattr(tr, attr).copy())
        tr2.context_rows, tr2.calls = dict(tr.context_rows), tr.calls
        n = choose_size(cost, [s for _, s in paths[:13]], tr2._sizes, tr2.margin)
        small = tr2.draft(history, 4)
        assert len(small) == n
        assert {tuple(small.tokens[j] for j in small.path_to(i)[1:]) for i in range(1, n)} == {
            p for p, _ in paths[:n - 1]}


def test_hindsight_trials_along_the_emitted_path():
    prior = np.full(NUM_BUCKETS, 0.5)
    tr = TokenRecycling(k=2, lookup=0, adaptive=False, max_nodes=20,
                        calibration=AcceptanceCalibration(prior=prior))
    tr.start([0], 10)
    probs = np.array([[0.6, 0.3]], dtype=np.float32)
    for token, succ in {1: [2, 3], 2: [4, 5], 3: [6, 7], 4: [8, 9]}.items():
        tr._store(np.array([token]), np.array([-1]), np.array([-1]), np.array([succ]), probs)
    tree = tr.draft([0, 1], 5)
    assert sorted(tree.tokens) == list(range(1, 10))  # every recorded successor
    assert not tr.calibration.trials.any()
    other = len(CONFIDENCE_BINS)  # another context (recorded after -1), this call
    b_hi, b_lo = other + plain_bin(0.6), other + plain_bin(0.3)
    tr.draft([0, 1, 3], 5)  # one token known: the root's two children are trials, 3 a hit
    assert tr.calibration.trials[[b_hi, b_lo]].tolist() == [1, 1]
    assert tr.calibration.hits[[b_hi, b_lo]].tolist() == [0, 1]
    tr.draft([0, 1, 3, 6], 5)  # 3's children: 6 a hit (rank 0); the earlier step's tree too
    # the tree drafted at [0, 1, 3] has root 3 whose children 6, 7 are trials again
    assert tr.calibration.trials[[b_hi, b_lo]].tolist() == [3, 3]
    assert tr.calibration.hits[[b_hi, b_lo]].tolist() == [2, 1]
    tr.draft([0, 1, 3, 6], 5)  # nothing new emitted: nothing counted twice
    assert tr.calibration.trials[[b_hi, b_lo]].tolist() == [3, 3]


def test_hindsight_trials_use_the_records_as_drafted():
    """The verification overwrites the rows of the tree's nodes before the hindsight walk:
    the trials must still score the successors (and buckets) the tree was drafted from."""
    tr = TokenRecycling(k=2, lookup=0, adaptive=False, max_nodes=3,
                        calibration=AcceptanceCalibration(prior=np.full(NUM_BUCKETS, 0.5)))
    tr.start([0], 10)
    tr._store(np.array([1]), np.array([-1]), np.array([-1]), np.array([[2, 3]]),
              np.array([[0.6, 0.3]], dtype=np.float32))
    tree = tr.draft([0, 1], 5)  # root 1 (after 0: another context) with children 2, 3
    assert tree.tokens == [1, 2, 3]
    logits = torch.full((3, 10), -5.0)
    logits[:, 3], logits[:, 2] = 5.0, 4.0  # every node now predicts 3, then 2
    tr.update(tree, logits, [0], [3])
    assert tr.matrix[1].tolist() == [3, 2]  # the row is rewritten
    tr.draft([0, 1, 3], 5)
    other = len(CONFIDENCE_BINS)
    b_hi, b_lo = other + plain_bin(0.6), other + plain_bin(0.3)
    # as drafted: 2 (recorded at 0.6) missed, 3 (recorded at 0.3) was the next token
    assert tr.calibration.trials[[b_hi, b_lo]].tolist() == [1, 1]
    assert tr.calibration.hits[[b_hi, b_lo]].tolist() == [0, 1]


def test_copied_chain_joins_the_candidates():
    tr = TokenRecycling(k=2, lookup=3, adaptive=False, max_nodes=10)
    history = [5, 6, 7, 8, 9, 1, 5, 6]
    tr.start(history, 10)
    tree = tr.draft(history, 5)  # nothing recorded: the tree is the copied chain 7 8 9
    assert tree.tokens == [6, 7, 8, 9] and tree.parents == [-1, 0, 1, 2]
    tr.calls = 1
    tr._store(np.array([6]), np.array([5]), np.array([-1]), np.array([[7, 2]]),
              np.array([[0.9, 0.05]], dtype=np.float32))
    tree = tr.draft(history, 5)  # the recycled 7 is the copied 7: one node, and 2 beside it
    assert sorted(tree.tokens) == [2, 6, 7, 8, 9]
    seven = tree.tokens.index(7)
    assert tree.parents[seven] == 0 and tree.tokens[tree.children[seven][0]] == 8
    buckets = {lookup_bucket(d, n) for d in range(1, 9) for n in (2, 3)}
    assert len(buckets) == 16 and max(buckets) == NUM_BUCKETS - 1
    assert lookup_bucket(20, 2) == lookup_bucket(8, 2) and lookup_bucket(1, 5) == lookup_bucket(1, 3)


def test_sizes_shrink_to_plain_steps_and_never_change_the_output():
    model = tiny_llama(V)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (1, 12), generator=g)
    ref = generate(model, ids, 40, repetition_penalty=1.2).tokens[0].tolist()
    saw = VerifyCost({1: 1.0, 2: 1.61, 3: 1.99, 4: 1.60, 8: 1.62, 16: 1.95, 32: 2.77})
    tr = TokenRecycling(cost=saw, warm_start=False, lookup=0)
    tr.start([0], V)
    never = [t for t in range(V) if t not in ref]
    succ = np.resize(never, (V, tr.k))
    tr._store(np.arange(V), np.full(V, -1), np.full(V, -1), succ,
              np.full((V, tr.k), 0.95, dtype=np.float32))
    tr.update = lambda *a: None  # keep the records useless
    history = list(ids[0].tolist())
    assert len(tr.draft(history, 5)) > 1  # the prior favours a tree
    tr._pending = []
    out = generate(model, ids, 40, repetition_penalty=1.2, speculative=tr)
    assert out.tokens[0].tolist() == ref
    assert out.stats.verified_tokens < 2 * out.stats.steps  # it shrank within the call
    assert len(tr.draft(history + ref, 5)) == 1
    free = VerifyCost({1: 1.0, 2: 1.01, 4: 1.02, 8: 1.03, 16: 1.04, 32: 1.05})
    tr = TokenRecycling(cost=free)
    for _ in range(2):  # big trees, the same output
        out = generate(model, ids, 40, repetition_penalty=1.2, speculative=tr)
        assert out.tokens[0].tolist() == ref
    assert max(tr.sizes_used) > 8


def test_bad_arguments():
    with pytest.raises(ValueError, match="tree must be"):
        TokenRecycling(tree="static")
    with pytest.raises(ValueError, match="template and template_size belong"):
        TokenRecycling(tree="dynamic", template_size=8)
    with pytest.raises(ValueError, match="max_nodes"):
        TokenRecycling(max_nodes=0)
    assert TokenRecycling(template_size=8).tree == "template"
    assert TokenRecycling().lookup == 8 and TokenRecycling(tree="template").lookup == 0
    assert list(itertools.islice(iter(TokenRecycling().sizes_used), 1)) == []
