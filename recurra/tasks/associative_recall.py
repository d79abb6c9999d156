"""Multi-query associative recall (MQAR, Zoology): recall the value bound to each queried key.

Layout for ``length`` n (the number of key-value pairs), sequence length 2n + q::

    inputs : k_1 v_1 k_2 v_2 ... k_n v_n  q_1 q_2 ... q_q
    targets:  -   -   -   -  ...  -   -   v(q_1) ... v(q_q)
    mask   :  0   0   0   0  ...  0   0   1   ...  1

Keys are distinct within a sequence, drawn from ``n_keys`` key tokens (ids ``0..n_keys-1``);
values from ``n_values`` value tokens (ids ``n_keys..n_keys+n_values-1``) with repetition. The
queries are ``q = n_queries or n`` keys of the context, without repetition, in random order.
Answering needs a state that stores n associations: the capacity test of the Zoology and
Just-Read-Twice papers.
"""

from __future__ import annotations

import numpy as np

from .sequence_task import SequenceTask, TaskBatch, check_int_option, make_batch


class AssociativeRecallTask(SequenceTask):
    name = "mqar"
    description = "multi-query associative recall: key-value pairs, then queried keys"
    length_meaning = "number of key-value pairs"
    primary_metric = "token"
    default_train_length = 8
    default_test_lengths = (4, 8, 16, 32, 48)

    def __init__(self, n_keys: int = 64, n_values: int = 64, n_queries: int = 0):
        self.n_keys = check_int_option("n_keys", n_keys, 1, 100_000)
        self.n_values = check_int_option("n_values", n_values, 1, 100_000)
        self.n_queries = check_int_option("n_queries", n_queries, 0)
        self.vocab_size = self.n_keys + self.n_values

    def options(self):
        return {"n_keys": self.n_keys, "n_values": self.n_values, "n_queries": self.n_queries}

    def check_length(self, length: int) -> None:
        super().check_length(length)
        if length > self.n_keys:
            raise ValueError(f"length (key-value pairs) must be <= n_keys={self.n_keys} because "
                             f"keys are distinct, got {length}")
        if self.n_queries > length:
            raise ValueError(f"n_queries={self.n_queries} must be <= length={length}")

    def queries(self, length: int) -> int:
        return self.n_queries or length

    def sequence_length(self, length: int) -> int:
        return 2 * length + self.queries(length)

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        q = self.queries(length)
        keys = np.argsort(rng.random((n, self.n_keys)), axis=1)[:, :length]
        values = self.n_keys + rng.integers(0, self.n_values, size=(n, length))
        pick = np.argsort(rng.random((n, length)), axis=1)[:, :q]
        query_keys = np.take_along_axis(keys, pick, axis=1)
        answers = np.take_along_axis(values, pick, axis=1)
        context = np.stack([keys, values], axis=2).reshape(n, 2 * length)
        inputs = np.concatenate([context, query_keys], axis=1)
        targets = np.concatenate([np.zeros_like(context), answers], axis=1)
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, 2 * length:] = True
        return make_batch(inputs, targets, mask, self.vocab_size)
