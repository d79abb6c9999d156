"""Copy and reverse: reproduce a random string after a separator (length generalisation).

Layout for ``length`` L (the number of symbols to copy), sequence length 2L + 1::

    inputs : x_1 ... x_L  SEP  BLANK ... BLANK        (L blanks)
    targets:  -  ...  -    -   y_1   ...  y_L          (y = x, or x reversed for ``reverse``)
    mask   :  0  ...  0    0    1    ...   1

The answer positions read only blanks, so one forward pass evaluates a model (no decoding loop):
sequence accuracy is the fraction of strings reproduced exactly, token accuracy the fraction of
characters. Training draws each batch's L uniformly from ``[max(1, L_train // 4), L_train]`` (as
the Universal Transformer experiments train on all lengths up to a maximum); testing at
L > L_train measures length generalisation.
"""

from __future__ import annotations

import numpy as np

from .sequence_task import SequenceTask, TaskBatch, check_bool_option, check_int_option, make_batch


class CopyTask(SequenceTask):
    name = "copy"
    description = "copy a random string after a separator (blank-filled answer positions)"
    length_meaning = "number of symbols to copy"
    primary_metric = "sequence"
    default_train_length = 16
    default_test_lengths = (8, 16, 24, 32, 48, 64)

    def __init__(self, n_symbols: int = 8, reverse: bool = False):
        self.n_symbols = check_int_option("n_symbols", n_symbols, 2, 10_000)
        self.reverse = check_bool_option("reverse", reverse)
        if self.reverse:
            self.name = "reverse"
            self.description = "reverse a random string after a separator"
        self.sep = self.n_symbols
        self.blank = self.n_symbols + 1
        self.vocab_size = self.n_symbols + 2

    def options(self):
        return {"n_symbols": self.n_symbols}

    def train_lengths(self, max_length: int) -> list[int]:
        return list(range(max(1, max_length // 4), max_length + 1))

    def sequence_length(self, length: int) -> int:
        return 2 * length + 1

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        x = rng.integers(0, self.n_symbols, size=(n, length))
        y = x[:, ::-1] if self.reverse else x
        inputs = np.concatenate(
            [x, np.full((n, 1), self.sep), np.full((n, length), self.blank)], axis=1)
        targets = np.zeros_like(inputs)
        targets[:, length + 1:] = y
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, length + 1:] = True
        return make_batch(inputs, targets, mask, self.vocab_size, strings=x)


def reverse_task(n_symbols: int = 8) -> CopyTask:
    """The reverse task (``CopyTask(reverse=True)``)."""
    return CopyTask(n_symbols=n_symbols, reverse=True)
