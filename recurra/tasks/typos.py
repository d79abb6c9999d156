"""Noisy-typo text for correction (Ghosh & Kristensson's keyboard decoder, tiny version).

Clean sentences of ``length`` words come from a small template grammar
(determiner adjective noun verb determiner noun, repeated). Noise is injected per character with
probability ``p`` (default 0.07), split evenly over the four edit types of the paper's typo
model: substitution by a QWERTY neighbour, deletion, insertion of a neighbour of the character,
and transposition with the next character.

:func:`noisy_pairs` returns (noisy, clean) strings. :class:`TypoCorrectionTask` lays them out as a
teacher-forced correction sequence (``T = 3 * C + 2`` with ``C = 8 * length``, right-padded)::

    inputs : noisy chars  SEP  c_1 ... c_m  PAD ...
    targets:      -       c_1  c_2 ... EOS
    mask   :      0        1    1  ...  1    0 ...

so sequence accuracy equals the exact-match rate of greedy decoding.
"""

from __future__ import annotations

import numpy as np

from .sequence_task import SequenceTask, TaskBatch, check_float_option, make_batch

DETERMINERS = ["the", "a", "my", "his", "her", "one", "each", "this"]
ADJECTIVES = ["old", "small", "green", "quick", "quiet", "bright", "cold", "happy", "dark",
              "brave"]
NOUNS = ["cat", "dog", "house", "river", "friend", "garden", "window", "teacher", "bird",
         "letter", "city", "boat"]
VERBS = ["sees", "likes", "finds", "helps", "paints", "opens", "follows", "writes", "calls",
         "keeps"]
PATTERN = [DETERMINERS, ADJECTIVES, NOUNS, VERBS, DETERMINERS, NOUNS]
MAX_WORD = max(len(w) for group in PATTERN for w in group)

QWERTY_ROWS = ["qwertyuiop", "asdfghjkl", "zxcvbnm"]


def _neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(QWERTY_ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in pos.items():
        near = [d for d, (r2, i2) in pos.items()
                if d != c and abs(r2 - r) <= 1 and abs(i2 - i + 0.5 * (r2 - r)) <= 1.0]
        out[c] = "".join(sorted(near))
    return out


NEIGHBOURS = _neighbours()
ALPHABET = "abcdefghijklmnopqrstuvwxyz "


def clean_sentence(n_words: int, rng: np.random.Generator) -> str:
    words = [PATTERN[i % len(PATTERN)][rng.integers(len(PATTERN[i % len(PATTERN)]))]
             for i in range(n_words)]
    return " ".join(words)


def add_typos(text: str, p: float, rng: np.random.Generator) -> str:
    """Each character is edited with probability ``p`` (substitute/delete/insert/transpose)."""
    out: list[str] = []
    chars = list(text)
    i = 0
    while i < len(chars):
        c = chars[i]
        if rng.random() >= p:
            out.append(c)
            i += 1
            continue
        kind = rng.integers(4)
        near = NEIGHBOURS.get(c, "")
        if kind == 0 and near:  # substitution by a keyboard neighbour
            out.append(near[rng.integers(len(near))])
        elif kind == 1:  # deletion
            pass
        elif kind == 2 and near:  # insertion of a neighbour after the character
            out += [c, near[rng.integers(len(near))]]
        elif kind == 3 and i + 1 < len(chars):  # transposition with the next character
            out += [chars[i + 1], c]
            i += 1
        else:
            out.append(c)
        i += 1
    return "".join(out)


def noisy_pairs(n: int, n_words: int, rng: np.random.Generator, p: float = 0.07):
    """``n`` (noisy, clean) sentence pairs of ``n_words`` words."""
    pairs = []
    for _ in range(n):
        clean = clean_sentence(n_words, rng)
        pairs.append((add_typos(clean, p, rng), clean))
    return pairs


class TypoCorrectionTask(SequenceTask):
    name = "typos"
    description = "correct keyboard typos in a templated sentence (teacher-forced)"
    length_meaning = "number of words"
    primary_metric = "sequence"
    default_train_length = 4
    default_test_lengths = (2, 4, 6, 8)
    sep, eos, pad = 27, 28, 29
    vocab_size = 30

    def __init__(self, p: float = 0.07):
        self.p = check_float_option("p", p, 0.0, 1.0)

    def options(self):
        return {"p": self.p}

    def encode(self, text: str) -> list[int]:
        return [ALPHABET.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(ALPHABET[i] if i < len(ALPHABET) else "" for i in ids)

    def sequence_length(self, length: int) -> int:
        return 3 * (MAX_WORD + 1) * length + 2

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        steps = self.sequence_length(length)
        inputs = np.full((n, steps), self.pad, dtype=np.int64)
        targets = np.zeros_like(inputs)
        mask = np.zeros(inputs.shape, dtype=bool)
        pairs = noisy_pairs(n, length, rng, self.p)
        for b, (noisy, clean) in enumerate(pairs):
            row = self.encode(noisy) + [self.sep] + self.encode(clean)
            inputs[b, : len(row)] = row
            start = len(noisy)
            answer = self.encode(clean) + [self.eos]
            targets[b, start:start + len(answer)] = answer
            mask[b, start:start + len(answer)] = True
        return make_batch(inputs, targets, mask, self.vocab_size,
                          noisy=np.array([p[0] for p in pairs]),
                          clean=np.array([p[1] for p in pairs]))
