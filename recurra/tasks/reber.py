"""Reber grammar strings: classify a string as grammatical or not (the Sparse-RNN benchmark).

The Reber grammar is the automaton (state: symbol -> next state)::

    start --B--> 1;   1: T->2, P->3;   2: S->2, X->4;   3: T->3, V->5;
    4: X->3, S->end;  5: P->4, V->end;  end --E--> accept

Valid strings are random walks (each branch with probability 1/2) of at most ``length`` symbols
(B and E included). Invalid strings are valid ones with one inner symbol replaced by another of
T, S, X, P, V such that the result is rejected by the automaton. Half the examples are valid.

Layout (sequence length ``length + 1``; strings are left-padded so the answer is last)::

    inputs : PAD ... PAD  B ... E  ANS
    targets:                        VALID or INVALID
"""

from __future__ import annotations

import numpy as np

from .sequence_task import SequenceTask, TaskBatch, make_batch

SYMBOLS = "BTSXPVE"
TRANSITIONS = {1: {"T": 2, "P": 3}, 2: {"S": 2, "X": 4}, 3: {"T": 3, "V": 5},
               4: {"X": 3, "S": 6}, 5: {"P": 4, "V": 6}}


def is_reber(string: str) -> bool:
    """Whether ``string`` is accepted by the Reber automaton."""
    if len(string) < 2 or string[0] != "B" or string[-1] != "E":
        return False
    state = 1
    for ch in string[1:-1]:
        nxt = TRANSITIONS.get(state, {}).get(ch)
        if nxt is None:
            return False
        state = nxt
    return state == 6


def random_reber(rng: np.random.Generator, max_length: int) -> str:
    """A random walk through the grammar of at most ``max_length`` symbols (B and E included)."""
    while True:
        out, state = ["B"], 1
        while state != 6 and len(out) < max_length:
            options = sorted(TRANSITIONS[state])
            ch = options[rng.integers(len(options))]
            out.append(ch)
            state = TRANSITIONS[state][ch]
        if state == 6 and len(out) + 1 <= max_length:
            return "".join(out) + "E"


def corrupt(string: str, rng: np.random.Generator) -> str:
    """Replace one inner symbol so that the string becomes ungrammatical."""
    while True:
        i = int(rng.integers(1, len(string) - 1))
        choices = [c for c in "TSXPV" if c != string[i]]
        candidate = string[:i] + choices[rng.integers(len(choices))] + string[i + 1:]
        if not is_reber(candidate):
            return candidate


class ReberTask(SequenceTask):
    name = "reber"
    description = "classify Reber-grammar strings as grammatical or not (one symbol corrupted)"
    length_meaning = "maximum string length (B and E included)"
    primary_metric = "sequence"
    default_train_length = 20
    default_test_lengths = (10, 20, 40, 80)
    min_length = 5
    pad, ans, invalid, valid = 7, 8, 9, 10
    vocab_size = 11

    def sequence_length(self, length: int) -> int:
        return length + 1

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        inputs = np.full((n, length + 1), self.pad, dtype=np.int64)
        labels = rng.integers(0, 2, size=n)
        strings = []
        for b in range(n):
            s = random_reber(rng, length)
            if not labels[b]:
                s = corrupt(s, rng)
            strings.append(s)
            inputs[b, length - len(s):length] = [SYMBOLS.index(c) for c in s]
        inputs[:, -1] = self.ans
        targets = np.zeros_like(inputs)
        targets[:, -1] = np.where(labels == 1, self.valid, self.invalid)
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, -1] = True
        return make_batch(inputs, targets, mask, self.vocab_size, strings=np.array(strings),
                          valid=labels.astype(bool))
