"""State tracking: parity and S5 permutation composition, labelled at every prefix.

Both tasks ask for the running product of a sequence of group elements, one answer per position
(``mask`` is all True; the "last" metric is the accuracy of the final product, the hardest one).

- ``parity``: inputs are bits, target t is ``(x_1 + ... + x_t) mod 2``. Chance is 0.5.
- ``s5``: inputs are permutations of 5 items (ids 0..119, ``itertools.permutations(range(5))``
  order), target t is the id of the arrangement reached by applying ``x_1``, then ``x_2``, ...,
  then ``x_t`` to the identity arrangement. Applying permutation ``p`` to arrangement ``s`` gives
  ``s'[i] = p[s[i]]``. S5 is not solvable, so a constant-depth (e.g. linear, diagonal,
  non-negative) recurrence cannot express it exactly at every length; a nonlinear RNN can.
  Chance is 1/120.
- ``inputs`` option of ``s5`` (and ``s3``): which group elements the inputs are drawn from.
  ``"all"`` (default) draws every permutation; ``"transpositions"`` draws only the
  ``n(n-1)/2`` transpositions (swaps of two items), as the state-tracking experiments of Grazzi
  et al. (negative eigenvalues) and DeltaProduct do. Transpositions generate S5, so the word
  problem is just as hard for a constant-depth recurrence, but a nonlinear RNN learns the
  120 x 10 transition table far faster than the 120 x 120 one. Input and target ids share the
  permutation id space either way (vocabulary 120).

``length`` is the number of group elements (= sequence length).
"""

from __future__ import annotations

import itertools

import numpy as np

from .sequence_task import (
    SequenceTask,
    TaskBatch,
    check_choice_option,
    check_int_option,
    make_batch,
)

INPUT_SETS = ("all", "transpositions")


class ParityTask(SequenceTask):
    name = "parity"
    tie_weights = False
    description = "running parity of a bit string, labelled at every position"
    length_meaning = "number of bits"
    primary_metric = "last"
    default_train_length = 16
    default_test_lengths = (8, 16, 32, 64, 128)
    vocab_size = 2

    def sequence_length(self, length: int) -> int:
        return length

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        bits = rng.integers(0, 2, size=(n, length))
        targets = np.cumsum(bits, axis=1) % 2
        return make_batch(bits, targets, np.ones_like(bits, dtype=bool), self.vocab_size)


def permutation_table(n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """All permutations of ``n_items`` (rows, lexicographic) and their composition table.

    ``table[p, s]`` is the id of the arrangement ``s'`` with ``s'[i] = perms[p][perms[s][i]]``.
    """
    perms = np.array(list(itertools.permutations(range(n_items))), dtype=np.int64)
    index = {tuple(p): i for i, p in enumerate(perms.tolist())}
    # composed[p, s, i] = perms[p, perms[s, i]]
    composed = perms[:, perms]  # (P, P, n): perms[p][perms[s]]
    table = np.empty((len(perms), len(perms)), dtype=np.int64)
    for p in range(len(perms)):
        for s in range(len(perms)):
            table[p, s] = index[tuple(composed[p, s].tolist())]
    return perms, table


class PermutationTask(SequenceTask):
    """Running composition of random permutations of ``n_items`` items (S5 by default)."""

    name = "s5"
    description = "S5 permutation composition (state tracking), labelled at every position"
    length_meaning = "number of permutations"
    primary_metric = "last"
    default_train_length = 16
    default_test_lengths = (8, 16, 32, 64, 128)

    #: input and target tokens mean different things (a move vs an arrangement)
    tie_weights = False

    def __init__(self, n_items: int = 5, inputs: str = "all"):
        self.n_items = check_int_option("n_items", n_items, 2, 6)
        self.inputs = check_choice_option("inputs", inputs, INPUT_SETS)
        if self.n_items != 5:
            self.name = f"s{self.n_items}"
            self.description = self.description.replace("S5", f"S{self.n_items}")
        self.perms, self.table = permutation_table(self.n_items)
        self.identity = 0  # (0, 1, ..., n-1) is first in lexicographic order
        self.vocab_size = len(self.perms)
        if self.inputs == "all":
            self.input_ids = np.arange(self.vocab_size)
        else:  # permutations that move exactly two items
            moved = (self.perms != np.arange(self.n_items)).sum(axis=1)
            self.input_ids = np.flatnonzero(moved == 2)

    def options(self):
        return {"n_items": self.n_items} | ({"inputs": self.inputs} if self.inputs != "all"
                                            else {})

    def sequence_length(self, length: int) -> int:
        return length

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        x = self.input_ids[rng.integers(0, len(self.input_ids), size=(n, length))]
        targets = np.empty_like(x)
        state = np.full(n, self.identity, dtype=np.int64)
        for t in range(length):
            state = self.table[x[:, t], state]
            targets[:, t] = state
        return make_batch(x, targets, np.ones_like(x, dtype=bool), self.vocab_size)
