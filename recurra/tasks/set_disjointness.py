"""Set disjointness (Just Read Twice): find the one item two sets share, in either order.

Layout (sequence length ``short_size + length + 4``, or ``2 * (short_size + length + 3)``
with ``jrt_prompt``)::

    inputs : BOS  first set ...  SEP  second set ...  SEP  ANS
    targets:  -        -          -        -           -   shared item
    mask   :  0        0          0        0           0   1

The short set has ``short_size`` items, the long set ``length`` items; both are drawn without
repetition from ``n_items`` item tokens and share exactly one item. ``order="short_first"`` puts
the short set first, ``order="long_first"`` the long one. A causal model must decide what to keep
in its state before it sees the second set: storing the short set and checking the long one
against it is easy, storing the long one is not, so causal accuracy depends on the order (the
claim of Arora et al., "Just read twice"). ``jrt_prompt=True`` repeats the context
(``BOS A SEP B SEP A SEP B SEP ANS``): on the second read the model already knows both sets.
"""

from __future__ import annotations

import numpy as np

from .sequence_task import (
    SequenceTask,
    TaskBatch,
    check_bool_option,
    check_choice_option,
    check_int_option,
    make_batch,
)

ORDERS = ("short_first", "long_first")


class SetDisjointnessTask(SequenceTask):
    name = "set_disjointness"
    description = "find the single item shared by a short and a long set (order matters causally)"
    length_meaning = "size of the long set"
    primary_metric = "sequence"
    default_train_length = 16
    default_test_lengths = (8, 16, 32, 48)

    def __init__(self, order: str = "short_first", short_size: int = 4, n_items: int = 128,
                 jrt_prompt: bool = False):
        self.order = check_choice_option("order", order, ORDERS)
        self.short_size = check_int_option("short_size", short_size, 1)
        self.n_items = check_int_option("n_items", n_items, 2, 100_000)
        self.jrt_prompt = check_bool_option("jrt_prompt", jrt_prompt)
        self.bos, self.sep, self.ans = self.n_items, self.n_items + 1, self.n_items + 2
        self.vocab_size = self.n_items + 3

    def options(self):
        return {"order": self.order, "short_size": self.short_size, "n_items": self.n_items,
                "jrt_prompt": self.jrt_prompt}

    def check_length(self, length: int) -> None:
        super().check_length(length)
        if length + self.short_size - 1 > self.n_items:
            raise ValueError(
                f"length + short_size - 1 = {length + self.short_size - 1} distinct items are "
                f"needed but n_items={self.n_items}; lower length or raise n_items")

    def sequence_length(self, length: int) -> int:
        context = self.short_size + length + 2  # BOS A SEP B
        return 2 * context + 2 if self.jrt_prompt else context + 2

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        s = self.short_size
        # n distinct items per row: the shared one, s-1 short-only, length-1 long-only
        items = np.argsort(rng.random((n, self.n_items)), axis=1)[:, : s + length - 1]
        shared = items[:, :1]
        short = np.concatenate([shared, items[:, 1:s]], axis=1)
        long = np.concatenate([shared, items[:, s:]], axis=1)
        short = np.take_along_axis(short, np.argsort(rng.random(short.shape), axis=1), axis=1)
        long = np.take_along_axis(long, np.argsort(rng.random(long.shape), axis=1), axis=1)
        first, second = (short, long) if self.order == "short_first" else (long, short)
        col = lambda v: np.full((n, 1), v)
        context = np.concatenate([col(self.bos), first, col(self.sep), second], axis=1)
        if self.jrt_prompt:  # read twice: BOS A SEP B SEP A SEP B
            context = np.concatenate([context, col(self.sep), context[:, 1:]], axis=1)
        inputs = np.concatenate([context, col(self.sep), col(self.ans)], axis=1)
        targets = np.zeros_like(inputs)
        targets[:, -1] = shared[:, 0]
        mask = np.zeros(inputs.shape, dtype=bool)
        mask[:, -1] = True
        return make_batch(inputs, targets, mask, self.vocab_size, first=first, second=second,
                          answer=shared[:, 0])
