"""Passkey retrieval (the Stuffed Mamba / Landmark template): find a 5-digit key in filler text.

The text follows the template of the Stuffed Mamba passkey script::

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.
    ... (filler repeated; the needle inserted at depth d) ...
    The passkey is 12345. Remember it. 12345 is the passkey.
    ... (more filler) ...
    What is the pass key? The passkey is 12345

``unit="word"`` (default) tokenises into words, punctuation and single digits (a 40-token
vocabulary, so contexts of a few hundred tokens fit a CPU run); ``unit="char"`` tokenises into
characters. ``length`` is the total number of tokens of the sequence; the filler fills whatever
the fixed parts leave (filler is cut at a token boundary, the needle is placed at a sentence
boundary of the filler, at the fraction ``depth`` of it: 0 = right after the prefix, 1 = right
before the question; ``depth=-1`` draws a depth uniformly per example).

The answer is scored with teacher forcing: the last 4 digits of the key are inputs, the answer
positions are the final "is" and those 4 digits, whose targets are the 5 digits. Sequence
accuracy (all 5 digits right) therefore equals exact-match accuracy of greedy decoding.
``key_digits`` (default 5) sets the length of the key: a shorter key is a lighter memory load,
which lets a tiny model learn retrieval at its training length on a CPU budget.
"""

from __future__ import annotations

import re

import numpy as np

from .sequence_task import (
    SequenceTask,
    TaskBatch,
    check_choice_option,
    check_float_option,
    check_int_option,
    make_batch,
)

PREFIX = ("There is an important info hidden inside a lot of irrelevant text. "
          "Find it and memorize it. ")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
NEEDLE = "The passkey is {key}. Remember it. {key} is the passkey. "
QUESTION = "What is the pass key? The passkey is "
DIGITS = "0123456789"
KEY_DIGITS = 5


def tokenize(text: str, unit: str) -> list[str]:
    """Words, punctuation and single digits (``unit="word"``) or characters (``"char"``)."""
    if unit == "char":
        return list(text)
    return re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text)


class PasskeyTask(SequenceTask):
    name = "passkey"
    description = "retrieve a 5-digit passkey hidden at a chosen depth in repeated filler text"
    length_meaning = "total number of tokens"
    primary_metric = "sequence"
    default_train_length = 64
    default_test_lengths = (64, 128, 256, 512)

    def __init__(self, unit: str = "word", depth: float = -1.0, key_digits: int = KEY_DIGITS):
        self.unit = check_choice_option("unit", unit, ("word", "char"))
        self.key_digits = check_int_option("key_digits", key_digits, 1, 10)
        depth = check_float_option("depth", depth, -1.0, 1.0)
        if -1.0 < depth < 0.0:
            raise ValueError(f"depth must lie in [0, 1] (or be -1 for random), got {depth}")
        self.depth = depth
        text = PREFIX + FILLER + NEEDLE.replace("{key}", "") + QUESTION
        symbols = set(tokenize(text, self.unit)) | set(DIGITS)
        self.symbols = sorted(symbols)
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.vocab_size = len(self.symbols)
        self.prefix = self.encode(PREFIX)
        self.question = self.encode(QUESTION.rstrip() if self.unit == "word" else QUESTION)
        self.filler = self.encode(FILLER)
        needle_parts = NEEDLE.split("{key}")
        self.needle_parts = [self.encode(p) for p in needle_parts]
        # sentence starts inside one filler period (the needle goes there)
        period = tokenize(FILLER, self.unit)
        self.filler_starts = [0] + [i + 1 for i, s in enumerate(period) if s == "."]
        if self.unit == "char":  # a sentence starts after ". "
            self.filler_starts = [0] + [i + 2 for i, s in enumerate(period)
                                        if s == "." and i + 2 < len(period)]
        self.filler_starts = sorted(set(s for s in self.filler_starts if s < len(period)))

    def options(self):
        extra = {"key_digits": self.key_digits} if self.key_digits != KEY_DIGITS else {}
        return {"unit": self.unit, "depth": self.depth} | extra

    def encode(self, text: str) -> np.ndarray:
        return np.array([self.index[s] for s in tokenize(text, self.unit)], dtype=np.int64)

    def decode(self, ids) -> str:
        sep = " " if self.unit == "word" else ""
        return sep.join(self.symbols[int(i)] for i in ids)

    def _needle_length(self) -> int:
        return sum(len(p) for p in self.needle_parts) + 2 * self.key_digits

    def _fixed_length(self) -> int:
        return len(self.prefix) + self._needle_length() + len(self.question) + self.key_digits - 1

    @property
    def min_length(self) -> int:  # type: ignore[override]
        return self._fixed_length()

    def sequence_length(self, length: int) -> int:
        return length

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        filler_len = length - self._fixed_length()
        period = len(self.filler)
        filler = self.filler[np.arange(filler_len) % period] if filler_len else \
            np.zeros(0, np.int64)
        # candidate needle positions: sentence starts inside the filler, plus its end
        cands = np.array(sorted({p for p in range(filler_len + 1)
                                 if p % period in self.filler_starts} | {filler_len}))
        depths = rng.random(n) if self.depth < 0 else np.full(n, self.depth)
        keys = rng.integers(0, 10, size=(n, self.key_digits))
        digit_ids = np.array([self.index[d] for d in DIGITS])
        inputs = np.empty((n, length), dtype=np.int64)
        positions = np.empty(n, dtype=np.int64)
        for b in range(n):
            pos = cands[np.argmin(np.abs(cands - depths[b] * filler_len))]
            key = digit_ids[keys[b]]
            needle = np.concatenate([self.needle_parts[0], key, self.needle_parts[1], key,
                                     self.needle_parts[2]])
            seq = np.concatenate([self.prefix, filler[:pos], needle, filler[pos:], self.question,
                                  key[:-1]])
            inputs[b] = seq
            positions[b] = len(self.prefix) + pos
        targets = np.zeros_like(inputs)
        mask = np.zeros(inputs.shape, dtype=bool)
        targets[:, -self.key_digits:] = digit_ids[keys]
        mask[:, -self.key_digits:] = True
        return make_batch(inputs, targets, mask, self.vocab_size, keys=keys,
                          needle_position=positions,
                          depth=np.where(filler_len > 0, (positions - len(self.prefix)) /
                                         max(filler_len, 1), 0.0))
