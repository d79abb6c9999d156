"""Generators of the application tasks (Reber, HMM, arrows, typos, Lorenz spikes), each checked
against an independent solver: a regex, path enumeration, ray marching, an edit-distance DP,
the Lorenz vector field."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from recurra.tasks.registry import build_task

REBER_REGEX = re.compile(r"^B(TS*X(XT*VP)*(S|XT*VV)|PT*V(V|P(XT*VP)*(S|XT*VV)))E$")


@pytest.mark.parametrize("name", ["hmm", "reber", "arrows", "typos"])
def test_determinism_and_shapes(name):
    task = build_task(name)
    n = task.default_train_length
    a, b = task.sample(8, n, seed=1), build_task(name).sample(8, n, seed=1)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.inputs, task.sample(8, n, seed=1, split="test").inputs)
    assert a.inputs.shape == (8, task.sequence_length(n))
    assert int(a.inputs.max()) < task.vocab_size and int(a.targets.max()) < task.vocab_size
    with pytest.raises(ValueError):
        task.sample(2, task.min_length - 1)


def test_reber_labels_by_regex():
    task = build_task("reber")
    batch = task.sample(200, 14, seed=0)
    strings, valid = batch.info["strings"], batch.info["valid"]
    assert 0.35 < valid.mean() < 0.65
    symbols = "BTSXPVE"
    for s, v, row, target in zip(strings, valid, batch.inputs.tolist(),
                                 batch.targets[:, -1].tolist()):
        assert bool(REBER_REGEX.match(s)) == bool(v)
        assert len(s) <= 14 and row[-1] == task.ans
        assert "".join(symbols[i] for i in row[:-1] if i < 7) == s
        assert target == (task.valid if v else task.invalid)


def test_hmm_filter_matches_path_enumeration_and_statistics():
    task = build_task("hmm:n_states=3:n_outputs=4:stay=0.8")
    rng = np.random.default_rng(0)
    emissions = rng.integers(0, 4, size=(3, 4))
    posterior = task.filter(emissions)
    for b in range(3):
        for t in range(4):  # brute force: sum the joint over all state paths of length t+1
            joint = np.zeros(3)
            for path in itertools.product(range(3), repeat=t + 1):
                p = task.initial[path[0]] * task.emission[path[0], emissions[b, 0]]
                for i in range(1, t + 1):
                    p *= task.transition[path[i - 1], path[i]] * \
                        task.emission[path[i], emissions[b, i]]
                joint[path[-1]] += p
            assert np.allclose(posterior[b, t], joint / joint.sum(), atol=1e-12)
    states, out = task.sample_hmm(400, 100, np.random.default_rng(1))
    stays = (states[:, 1:] == states[:, :-1]).mean()
    assert abs(stays - 0.8) < 0.01
    for s in range(3):
        freq = np.bincount(out[states == s], minlength=4) / (states == s).sum()
        assert np.allclose(freq, task.emission[s], atol=0.02)
    batch = task.sample(64, 50, seed=0)
    bayes_acc = (batch.info["bayes"] == batch.targets.numpy()).mean()
    assert bayes_acc > 1 / 3  # the optimum beats chance


def test_arrows_labels_by_ray_marching():
    from recurra.tasks.arrow_pointing import arrow_images

    images, labels, geo = arrow_images(60, 32, np.random.default_rng(4))
    assert 0.3 < labels.mean() < 0.7
    for b in range(60):
        head, tail = geo["head"][b], geo["tail"][b]
        d = (head - tail) / np.linalg.norm(head - tail)
        hit = any(np.linalg.norm(head + s * d - geo["center"][b]) <= geo["radius"][b] + 1e-9
                  for s in np.arange(0, 200, 0.01))
        assert hit == labels[b]
        assert (images[b] == 0.5).any() and (images[b] == 1.0).any()
    task = build_task("arrows")
    batch = task.sample(10, 16, seed=0)
    assert set(batch.targets[:, -1].tolist()) <= {task.yes, task.no}


def damerau_levenshtein(a: str, b: str) -> int:
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = 0 if a[i - 1] == b[j - 1] else 1
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def test_typos_noise_rate_and_targets():
    from recurra.tasks.typos import PATTERN, noisy_pairs

    pairs = noisy_pairs(300, 6, np.random.default_rng(0), p=0.07)
    edits = sum(damerau_levenshtein(n, c) for n, c in pairs)
    chars = sum(len(c) for _, c in pairs)
    assert 0.04 < edits / chars < 0.08  # some edits cancel or are impossible (e.g. on spaces)
    for _, clean in pairs[:50]:
        for i, word in enumerate(clean.split(" ")):
            assert word in PATTERN[i % len(PATTERN)]
    assert all(n == c for n, c in noisy_pairs(20, 4, np.random.default_rng(1), p=0.0))
    task = build_task("typos")
    batch = task.sample(10, 3, seed=0)
    for b in range(10):
        answer = batch.targets[b][batch.mask[b]].tolist()
        assert answer[-1] == task.eos and task.decode(answer[:-1]) == batch.info["clean"][b]
        row = batch.inputs[b].tolist()
        assert task.decode(row[: row.index(task.sep)]) == batch.info["noisy"][b]


def test_lorenz_follows_the_vector_field_and_poisson_means():
    from recurra.tasks.lorenz_spikes import lorenz_field, lorenz_spike_trains

    data = lorenz_spike_trains(20, 60, n_neurons=8, seed=0, dt=0.002)
    x = data.states
    derivative = (x[:, 2:] - x[:, :-2]) / (2 * data.bin_seconds)
    field = lorenz_field(x[:, 1:-1])
    assert np.abs(derivative - field).max() / np.abs(field).max() < 1e-3
    again = lorenz_spike_trains(20, 60, n_neurons=8, seed=0, dt=0.002)
    assert np.array_equal(again.spikes, data.spikes)
    other = lorenz_spike_trains(20, 60, n_neurons=8, seed=0, dt=0.002, split="test")
    assert not np.array_equal(other.states, data.states)
    big = lorenz_spike_trains(400, 50, n_neurons=5, seed=1)
    assert abs(big.spikes.mean() - big.rates.mean()) < 0.05 * big.rates.mean()
    assert np.allclose(np.log(big.rates), big.latents @ big.weights + big.bias)
    assert math.isclose(big.latents.std(), 1.0, rel_tol=0.25)
    with pytest.raises(ValueError, match="n_trials"):
        lorenz_spike_trains(0)
