"""What verifying k tokens at once costs on this hardware, relative to one token.

Speculative methods trade extra verified tokens for fewer model passes, so their best draft size
depends on how a forward's cost grows with k. On a CPU it is far from linear and not even
monotone (small-M GEMM paths: 3 tokens can cost more than 4). :class:`VerifyCost` holds a
measured table; drafters use :meth:`gain` to pick draft sizes and adapters pad a draft to the
cheapest size that holds it (:meth:`padded_sizes`).

:data:`CPU_2CORE_SMOLLM2` is the table measured on the project's 2-core CPU machines for
SmolLM2-135M through ``LlamaLM`` (fp32, 2 threads, 200-token cache; see docs/decoding.md); :func:`measure` measures
a table for any adapter.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch


class VerifyCost:
    def __init__(self, table: dict[int, float]):
        if not table or 1 not in table:
            raise ValueError("a cost table must be a non-empty dict {k: cost} containing k=1")
        base = table[1]
        self.table = {int(k): float(v) / base for k, v in sorted(table.items())}
        # drafters ask for these every step: computed once (the table never changes)
        top = max(self.table)
        rel = [0.0] + [self.relative(k) for k in range(1, top + 1)]
        self._effective = [0.0] * (top + 1)
        cheapest = float("inf")
        for k in range(top, 0, -1):
            cheapest = min(cheapest, rel[k])
            self._effective[k] = cheapest
        self._padded = [k for k in range(1, top + 1)
                        if all(rel[j] > rel[k] for j in range(k + 1, top + 1))]

    def relative(self, k: int) -> float:
        """Cost of verifying k tokens / cost of 1 (linear interpolation, held past the end)."""
        ks = list(self.table)
        if k in self.table:
            return self.table[k]
        if k > ks[-1]:
            return self.table[ks[-1]] * k / ks[-1]
        lo = max(x for x in ks if x < k)
        hi = min(x for x in ks if x > k)
        w = (k - lo) / (hi - lo)
        return (1 - w) * self.table[lo] + w * self.table[hi]

    def effective(self, k: int) -> float:
        """Cost of k tokens when padding to a cheaper larger size is allowed."""
        return self._effective[k] if 1 <= k < len(self._effective) else self.relative(k)

    def padded_sizes(self) -> list[int]:
        """Sizes worth running: a size is kept unless a larger one is no more expensive."""
        return list(self._padded)

    def gain(self, expected_tokens: float, k: int) -> float:
        """Tokens per unit cost of a verify of k tokens expected to emit ``expected_tokens``."""
        return expected_tokens / self.effective(k)


#: measured on the 2-core CPU (SmolLM2-135M-Instruct fp32 through LlamaLM's compiled few-token
#: forward, 2 threads, 200-token KV cache, best-first trees; 2026-11-27, ``recurra bench decode``)
CPU_2CORE_SMOLLM2 = VerifyCost({1: 1.00, 2: 1.08, 3: 1.13, 4: 1.15, 6: 1.21, 8: 1.29, 12: 1.40,
                                16: 1.74, 24: 2.15, 32: 2.67})


@torch.no_grad()
def measure(adapter, context: Sequence[int], sizes: Sequence[int] = (1, 2, 3, 4, 6, 8, 12, 16,
                                                                     24, 32),
            repeats: int = 5, tree: bool = False, clock=time.perf_counter) -> VerifyCost:
    """Time ``verify`` of each size against a one-token verify timed right beside it, after a
    prefill of ``context``: each size's cost is the median over ``repeats`` rounds (after one
    warm-up round) of its time / the time of the one-token verify of the same pair. A pair
    shares the machine's speed of the moment, so a drift between pairs cancels (timing every
    size against one k = 1 time per round does not: on a VM a slow moment there skews the whole
    table). The sizes' order and the order within a pair flip every other round.
    ``tree=False`` verifies chains (prompt lookup's shape), ``tree=True`` best-first trees
    (Token Recycling's shape: tree attention mask)."""
    from .tree import DraftTree, TreeTemplate

    context = list(context)
    sizes = sorted({int(k) for k in sizes} | {1})
    if len(context) < max(sizes) + 1:
        raise ValueError(f"context must hold at least max(sizes) + 1 = {max(sizes) + 1} tokens")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    session = adapter.new_session()
    session.append(torch.tensor([context], device=adapter.device), logits_to_keep=1)
    drafts = {}
    for k in sizes:
        parents = TreeTemplate.best_first(k).parents if tree else list(range(-1, k - 1))
        drafts[k] = DraftTree([context[-1]] + context[:k - 1], parents)

    def timed(k: int) -> float:
        start = clock()
        session.verify(drafts[k])
        elapsed = clock() - start
        session.commit([])
        return elapsed

    ratios: dict[int, list[float]] = {k: [] for k in sizes if k > 1}
    for r in range(repeats + 1):
        for k in (sizes[1:] if r % 2 == 0 else sizes[:0:-1]):
            if r % 2 == 0:
                one, many = timed(1), timed(k)
            else:
                many, one = timed(k), timed(1)
            if r:
                ratios[k].append(many / one)
    return VerifyCost({1: 1.0, **{k: statistics.median(v) for k, v in ratios.items()}})
