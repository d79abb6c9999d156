"""Synthetic task generators: determinism, length control and labels checked by independent
solvers (a plain loop, a set intersection, a direct permutation simulation, a regex)."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch

from recurra.tasks.registry import available, build_task, parse_spec

SEQUENCE_TASKS = ["copy", "reverse", "parity", "s5", "mqar", "set_disjointness", "passkey"]


def small_length(task):
    return max(task.min_length, 6)


@pytest.mark.parametrize("name", SEQUENCE_TASKS)
def test_deterministic_and_split_streams(name):
    task = build_task(name)
    n = small_length(task)
    a = task.sample(16, n, seed=3)
    b = build_task(name).sample(16, n, seed=3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
    assert torch.equal(a.mask, b.mask)
    other_seed = task.sample(16, n, seed=4)
    test_split = task.sample(16, n, seed=3, split="test")
    assert not torch.equal(a.inputs, other_seed.inputs)
    assert not torch.equal(a.inputs, test_split.inputs)


@pytest.mark.parametrize("name", SEQUENCE_TASKS)
def test_length_control_and_vocab(name):
    task = build_task(name)
    base = small_length(task)
    for length in (base, base + 3, 2 * base + 1):
        batch = task.sample(5, length, seed=0)
        assert batch.inputs.shape == (5, task.sequence_length(length))
        assert batch.inputs.dtype == torch.long and batch.mask.dtype == torch.bool
        assert int(batch.inputs.min()) >= 0 and int(batch.inputs.max()) < task.vocab_size
        assert int(batch.targets.max()) < task.vocab_size
        assert bool(batch.mask.any(dim=1).all())
        assert bool((batch.targets[~batch.mask] == 0).all())


@pytest.mark.parametrize("name", SEQUENCE_TASKS)
def test_bad_arguments_raise(name):
    task = build_task(name)
    with pytest.raises(ValueError, match="length"):
        task.sample(2, task.min_length - 1)
    with pytest.raises(ValueError, match="n must"):
        task.sample(0, small_length(task))
    with pytest.raises(ValueError, match="split"):
        task.sample(2, small_length(task), split="dev")
    with pytest.raises(ValueError, match="seed"):
        task.sample(2, small_length(task), seed=-1)


@pytest.mark.parametrize("reverse", [False, True])
def test_copy_and_reverse_targets(reverse):
    task = build_task("reverse" if reverse else "copy", n_symbols=5)
    batch = task.sample(20, 7, seed=1)
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(),
                                 batch.mask.tolist()):
        string = row[:7]
        assert row[7] == task.sep and row[8:] == [task.blank] * 7
        answer = [t for t, m in zip(target, mask) if m]
        assert answer == (string[::-1] if reverse else string)
        assert mask == [False] * 8 + [True] * 7
    lengths = task.train_lengths(16)
    assert lengths[0] == 4 and lengths[-1] == 16


def test_parity_labels_by_loop():
    batch = build_task("parity").sample(50, 33, seed=2)
    for bits, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        acc = 0
        for b, t in zip(bits, target):
            acc ^= b
            assert t == acc
    assert bool(batch.mask.all())


@pytest.mark.parametrize("name,items", [("s5", 5), ("s3", 3), ("s5:inputs=transpositions", 5),
                                        ("s3:inputs=transpositions", 3)])
def test_permutation_labels_by_direct_simulation(name, items):
    task = build_task(name)
    perms = list(itertools.permutations(range(items)))  # the documented id order
    batch = task.sample(30, 20, seed=5)
    for ids, target in zip(batch.inputs.tolist(), batch.targets.tolist()):
        arrangement = list(range(items))
        for g, t in zip(ids, target):
            p = perms[g]
            arrangement = [p[i] for i in arrangement]
            assert perms[t] == tuple(arrangement)
    assert task.vocab_size == math.factorial(items)
    assert task.tie_weights is False  # a move and an arrangement are different things
    # the composition is not commutative: S5 is non-abelian
    assert not np.array_equal(task.table, task.table.T)
    used = set(batch.inputs.flatten().tolist())
    if "transpositions" in name:  # only swaps of exactly two items, all of them used
        swaps = {i for i, p in enumerate(perms) if sum(a != b for a, b in enumerate(p)) == 2}
        assert len(swaps) == items * (items - 1) // 2 and used == swaps
    else:
        assert len(used) > len(perms) // 2
    with pytest.raises(ValueError, match="inputs"):
        build_task(name.split(":")[0] + ":inputs=cycles")


def test_mqar_labels_by_lookup():
    task = build_task("mqar:n_keys=16:n_values=8")
    batch = task.sample(40, 10, seed=7)
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(),
                                 batch.mask.tolist()):
        context, queries = row[:20], row[20:]
        pairs = dict(zip(context[0::2], context[1::2]))
        assert len(pairs) == 10  # keys are distinct
        assert all(k < 16 for k in pairs) and all(16 <= v < 24 for v in pairs.values())
        assert sorted(queries) == sorted(pairs)  # every key queried once
        assert [t for t, m in zip(target, mask) if m] == [pairs[q] for q in queries]
    with pytest.raises(ValueError, match="n_keys"):
        task.sample(2, 17)


@pytest.mark.parametrize("order", ["short_first", "long_first"])
@pytest.mark.parametrize("jrt", [False, True])
def test_set_disjointness_by_brute_force(order, jrt):
    task = build_task(f"set_disjointness:order={order}:jrt_prompt={jrt}:n_items=32:short_size=3")
    batch = task.sample(40, 9, seed=11)
    for row, target, mask in zip(batch.inputs.tolist(), batch.targets.tolist(),
                                 batch.mask.tolist()):
        assert row[0] == task.bos and row[-1] == task.ans and mask[-1] and sum(mask) == 1
        body = row[1:-2]  # between BOS and the final SEP ANS
        chunks, cur = [], []
        for tok in body:
            if tok == task.sep:
                chunks.append(cur)
                cur = []
            else:
                cur.append(tok)
        chunks.append(cur)
        assert len(chunks) == (4 if jrt else 2)
        first, second = chunks[0], chunks[1]
        if jrt:
            assert chunks[2] == first and chunks[3] == second
        sizes = (3, 9) if order == "short_first" else (9, 3)
        assert (len(first), len(second)) == sizes
        assert len(set(first)) == len(first) and len(set(second)) == len(second)
        shared = set(first) & set(second)  # brute-force intersection
        assert len(shared) == 1 and target[-1] == shared.pop()
    with pytest.raises(ValueError, match="n_items"):
        task.sample(2, 31)


@pytest.mark.parametrize("unit", ["word", "char"])
def test_passkey_template_and_depth(unit):
    task = build_task(f"passkey:unit={unit}")
    length = task.min_length + 40
    batch = task.sample(12, length, seed=2)
    joiner = " " if unit == "word" else ""
    for row, target, mask, key in zip(batch.inputs.tolist(), batch.targets.tolist(),
                                      batch.mask.tolist(), batch.info["keys"]):
        text = task.decode(row)
        digits = "".join(map(str, key))
        spaced = joiner.join(digits)
        assert text.startswith("There is an important info hidden inside a lot of irrelevant")
        assert f"The passkey is {spaced} . Remember it . {spaced} is the passkey ." in text \
            if unit == "word" else \
            f"The passkey is {digits}. Remember it. {digits} is the passkey." in text
        question = "What is the pass key ? The passkey is" if unit == "word" else \
            "What is the pass key? The passkey is "
        assert text.endswith(question + joiner + joiner.join(digits[:-1]))
        answer = "".join(task.symbols[t] for t, m in zip(target, mask) if m)
        assert answer == digits
    # depth 0: the needle right after the prefix; depth 1: right before the question
    first = build_task(f"passkey:unit={unit}:depth=0").sample(3, length, seed=0)
    last = build_task(f"passkey:unit={unit}:depth=1").sample(3, length, seed=0)
    assert (first.info["needle_position"] == len(task.prefix)).all()
    assert (last.info["needle_position"] == length - len(task.question) - 4
            - task._needle_length()).all()
    mid = build_task(f"passkey:unit={unit}:depth=0.5").sample(3, 4 * length, seed=0)
    assert np.allclose(mid.info["depth"], 0.5, atol=0.1)
    with pytest.raises(ValueError, match="depth"):
        build_task("passkey:depth=1.5")


def test_passkey_key_digits():
    for digits in (1, 2, 5):
        task = build_task(f"passkey:key_digits={digits}:depth=0.5")
        length = task.min_length + 30
        batch = task.sample(6, length, seed=1)
        assert batch.inputs.shape == (6, length) and int(batch.mask.sum(1).max()) == digits
        for row, target, mask, key in zip(batch.inputs.tolist(), batch.targets.tolist(),
                                          batch.mask.tolist(), batch.info["keys"]):
            spaced = " ".join(map(str, key))
            text = task.decode(row)
            assert f"The passkey is {spaced} . Remember it . {spaced} is the passkey ." in text
            assert [task.symbols[t] for t, m in zip(target, mask) if m] == list(map(str, key))
            assert mask == [False] * (length - digits) + [True] * digits
    # the default key keeps its random stream (same as before the option existed)
    assert build_task("passkey").key() == build_task("passkey:key_digits=5").key()
    assert build_task("passkey:key_digits=2").min_length == build_task("passkey").min_length - 9
    with pytest.raises(ValueError, match="key_digits"):
        build_task("passkey:key_digits=0")


def test_registry_specs_and_errors():
    assert set(SEQUENCE_TASKS) <= set(available())
    assert parse_spec("a:x=1:y=true:z=0.5:w=abc") == ("a", {"x": 1, "y": True, "z": 0.5,
                                                           "w": "abc"})
    with pytest.raises(ValueError, match="unknown task"):
        build_task("no_such_task")
    with pytest.raises(ValueError, match="option=value"):
        build_task("parity:oops")
    with pytest.raises(ValueError, match="order"):
        build_task("set_disjointness:order=sideways")
    with pytest.raises(ValueError, match="parity"):
        build_task("parity:bogus=1")
    assert re.match(r"set_disjointness\(", build_task("set_disjointness").key())
