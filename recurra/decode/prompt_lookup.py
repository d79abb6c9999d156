"""Prompt lookup decoding: draft the continuation of the latest earlier occurrence of the
context's last n-gram.

transformers' ``PromptLookupCandidateGenerator`` drafts a fixed number of tokens after the
*first* match of the last 1-2 tokens anywhere in the sequence, at every step. On a CPU a wasted
draft costs up to 2x a plain step, so this drafter (the engine's default) adds:

- matches of at least ``min_ngram`` tokens (default 2), longest n first, **latest** occurrence
  (the most recent repetition predicts best);
- an acceptance estimate per n-gram length (exponential moving average of the fraction of
  drafted tokens accepted), and a draft length chosen to maximise expected tokens per unit of
  verification cost (:class:`~recurra.decode.cost_model.VerifyCost`); when no length beats a plain
  step it does not draft, and the estimate drifts back to its prior so drafting is retried.

``PromptLookup(adaptive=False, min_ngram=1, num_draft=10, latest=False)`` is transformers'
behaviour (the anchor).
"""

from __future__ import annotations

from collections.abc import Sequence

from .cost_model import CPU_2CORE_SMOLLM2, VerifyCost
from .speculative import Drafter
from .tree import DraftTree


class PromptLookup(Drafter):
    name = "prompt_lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2, num_draft: int = 15,
                 adaptive: bool = True, latest: bool = True,
                 cost: VerifyCost | None = CPU_2CORE_SMOLLM2, prior: float = 0.6,
                 smoothing: float = 0.3):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {num_draft}")
        self.max_ngram, self.min_ngram, self.num_draft = max_ngram, min_ngram, num_draft
        self.adaptive, self.latest = adaptive, latest
        self.cost, self.prior, self.smoothing = cost, prior, smoothing

    def start(self, prompt: Sequence[int], vocab_size: int) -> None:
        self.index: dict[tuple, int] = {}   # n-gram -> position right after it
        self.indexed = 0                   # n-grams ending before this position are indexed
        self.acceptance = {n: self.prior for n in range(self.min_ngram, self.max_ngram + 1)}
        self.last_n = 0

    def _index_until(self, history: list[int], end: int) -> None:
        """Index every n-gram that ends at a position < end - 1 (so it has a successor)."""
        for pos in range(self.indexed, end - 1):  # n-gram ends at pos (inclusive)
            for n in range(self.min_ngram, self.max_ngram + 1):
                if pos + 1 >= n:
                    key = tuple(history[pos + 1 - n:pos + 1])
                    if self.latest or key not in self.index:
                        self.index[key] = pos + 1
        self.indexed = max(self.indexed, end - 1)

    def _draft_length(self, n: int) -> int:
        if not self.adaptive or self.cost is None:
            return self.num_draft
        a = self.acceptance[n]
        best_d, best_gain = 0, 1.0
        expected = 1.0
        for d in range(1, self.num_draft + 1):
            expected += a ** d
            gain = self.cost.gain(expected, d + 1)
            if gain > best_gain * 1.02:
                best_d, best_gain = d, gain
        return best_d

    def draft(self, history: list[int], max_depth: int) -> DraftTree:
        self._index_until(history, len(history))
        self.last_n = 0
        if max_depth > 0:
            for n in range(self.max_ngram, self.min_ngram - 1, -1):
                if len(history) < n:
                    continue
                start = self.index.get(tuple(history[-n:]))
                if start is None:
                    continue
                length = min(self._draft_length(n), max_depth)
                drafts = history[start:start + length]
                if not drafts:
                    continue
                self.last_n = n
                return DraftTree.chain(history[-1], drafts)
            # no usable match: let the estimates recover towards the prior
            for n in self.acceptance:
                self.acceptance[n] += 0.1 * self.smoothing * (self.prior - self.acceptance[n])
        return DraftTree([history[-1]], [-1])

    def update(self, tree, logits, path, emitted) -> None:
        if self.last_n and len(tree) > 1:
            drafted = len(tree) - 1
            accepted = len(path) - 1
            frac = accepted / drafted
            a = self.acceptance[self.last_n]
            self.acceptance[self.last_n] = (1 - self.smoothing) * a + self.smoothing * frac
