"""ADED-style adaptive n-gram drafting (Liu et al., arXiv 2407.12021), verified losslessly.

A tri-gram table maps a key (a, b) to successor scores ``{c: score}``:

- an optional corpus (token id sequences) seeds it with normalised counts, pruned to the top
  ``top_successors`` (12) successors per key;
- *adaptive updates*: at the start of a call every tri-gram of the prompt, and after every step
  each tri-gram inside the last ``window`` (16) tokens, gains ``increment`` (0.04), capped at
  ``cap`` (3.0). The table is kept across calls, like the paper's.

Drafting is a tree search from the key (x[-2], x[-1]): a best-first search over successor paths
ranked by the product of normalised successor scores (the distribution that the paper's MCTS
visit counts follow when, as in its reference code, the rollout value is constant), at most
``max_depth`` (4) deep. The tree keeps the prefix of best-first nodes that maximises expected
emitted tokens per unit of verification cost (:class:`~recurra.decode.cost_model.VerifyCost`),
so a weak table drafts little. Verification is the engine's lossless walk (greedy or
sample-and-match) instead of the paper's per-row nucleus sampling, which is biased.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence

from .cost_model import CPU_2CORE_SMOLLM2, VerifyCost
from .speculative import Drafter
from .tree import DraftTree


class ADED(Drafter):
    name = "aded"

    def __init__(self, corpus: Iterable[Sequence[int]] | None = None, max_nodes: int = 16,
                 max_depth: int = 4, top_successors: int = 12, window: int = 16,
                 increment: float = 0.04, cap: float = 3.0,
                 cost: VerifyCost | None = CPU_2CORE_SMOLLM2, calibration: float = 0.8):
        self.table: dict[tuple[int, int], dict[int, float]] = {}
        self.max_nodes, self.max_depth = max_nodes, max_depth
        self.top_successors, self.window = top_successors, window
        self.increment, self.cap = increment, cap
        self.cost, self.calibration = cost, calibration
        if corpus is not None:
            self.add_corpus(corpus)

    def add_corpus(self, corpus: Iterable[Sequence[int]]) -> None:
        counts: dict[tuple[int, int], dict[int, int]] = {}
        for seq in corpus:
            seq = list(seq)
            for a, b, c in zip(seq, seq[1:], seq[2:]):
                succ = counts.setdefault((a, b), {})
                succ[c] = succ.get(c, 0) + 1
        for key, succ in counts.items():
            total = sum(succ.values())
            best = sorted(succ.items(), key=lambda kv: -kv[1])[:self.top_successors]
            row = self.table.setdefault(key, {})
            for c, n in best:
                row[c] = max(row.get(c, 0.0), n / total)

    def _bump(self, tokens: Sequence[int]) -> None:
        for a, b, c in zip(tokens, tokens[1:], tokens[2:]):
            row = self.table.setdefault((a, b), {})
            row[c] = min(self.cap, row.get(c, 0.0) + self.increment)

    def start(self, prompt: Sequence[int], vocab_size: int) -> None:
        self._bump(list(prompt))
        self._recent = list(prompt)[-self.window:]

    def _successors(self, a: int, b: int) -> list[tuple[float, int]]:
        row = self.table.get((a, b))
        if not row:
            return []
        best = heapq.nlargest(self.top_successors, row.items(), key=lambda kv: kv[1])
        total = sum(s for _, s in best)
        return [(s / total, c) for c, s in best]

    def draft(self, history: list[int], max_depth: int) -> DraftTree:
        depth_limit = min(self.max_depth, max_depth)
        root = DraftTree([history[-1]], [-1])
        if len(history) < 2 or depth_limit < 1:
            return root
        # best-first: (negative path probability, tie-break, prev token, token, parent, depth)
        heap, counter = [], 0
        for p, c in self._successors(history[-2], history[-1]):
            heap.append((-p, counter, history[-1], c, 0, 1))
            counter += 1
        heapq.heapify(heap)
        tokens, parents, probs = [history[-1]], [-1], []
        while heap and len(tokens) < self.max_nodes:
            neg, _, prev, tok, parent, depth = heapq.heappop(heap)
            node = len(tokens)
            tokens.append(tok)
            parents.append(parent)
            probs.append(-neg)
            if depth < depth_limit:
                for p, c in self._successors(prev, tok):
                    heapq.heappush(heap, (neg * p, counter, tok, c, node, depth + 1))
                    counter += 1
        keep = self._best_size(probs)
        return DraftTree(tokens[:keep + 1], parents[:keep + 1])

    def _best_size(self, probs: list[float]) -> int:
        """How many best-first nodes to keep (their parents come first, so any prefix is a tree)."""
        if self.cost is None:
            return len(probs)
        best, best_gain, expected = 0, 1.0, 1.0
        for i, p in enumerate(probs, 1):
            expected += self.calibration * p
            gain = self.cost.gain(expected, i + 1)
            if gain > best_gain:
                best, best_gain = i, gain
        return best

    def update(self, tree, logits, path, emitted) -> None:
        self._recent = (self._recent + list(emitted))[-self.window:]
        self._bump(self._recent)
