"""Token Recycling (Luo et al., arXiv 2408.08696): recycle the model's own top-k predictions.

An adjacency matrix ``A`` (V x k) stores, for every token, the top-k next tokens the model
predicted the last time that token was a draft-tree node. ``A`` is kept across calls ("hot
start": it is a property of the model, not of the prompt). Each step:

1. fill a static :class:`~recurra.decode.tree.TreeTemplate` breadth-first:
   ``token[node] = A[token[parent], rank[node]]`` (one gather per level);
2. drop a node whose token repeats an earlier sibling's (with its subtree) and nodes deeper than
   the remaining budget; the model verifies the tree in one pass;
3. after verification, every node's row is overwritten with the top-k of its logits, rejected
   branches included (the first occurrence of a token in BFS order wins).

Our additions, each measured in ``recurra bench decode`` (docs/decoding.md):

- **warm start** (``warm_start=True``): the prefill computes the logits of every prompt position
  anyway, so row ``prompt[i]`` is set to the top-k of position i's logits (the latest occurrence
  of a token wins) before the first step: the matrix knows the prompt's own vocabulary and
  phrasing instead of starting cold.
- **template from the measured cost**: on a CPU, verifying n tokens costs far less than n steps
  but far more than one, and not monotonically (:mod:`recurra.decode.cost_model`). The template
  keeps the nodes most likely to be accepted (:meth:`TreeTemplate.best_first`, per-node
  acceptance probabilities) and its size maximises expected emitted tokens per unit of verify
  cost (:func:`choose_size`). :data:`DEFAULT_NODE_ACCEPTANCE` is only the prior of the live
  estimates below (not a measurement).
- **adaptive size** (``adaptive=True``): every step's full template is also scored *in hindsight*
  against the tokens actually emitted next ("would node i have been accepted?"), whatever was
  verified; an exponential moving average of these hits per node gives live acceptance
  estimates, and each step verifies the prefix of the template (nodes by estimate) that
  maximises expected tokens per unit of cost — down to a plain single-token step when no tree
  pays, so a kind of text where recycling fails costs (almost) nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..ops.top_k import top_k
from .cost_model import CPU_2CORE_SMOLLM2, VerifyCost
from .speculative import Drafter
from .tree import DraftTree, TreeTemplate

#: prior probability that the rank-r recycled successor is the next token, per level (a guess
#: in line with the mean accepted lengths we saw with a hot matrix on SmolLM2-135M; the adaptive
#: mode replaces it by live per-node estimates within a few steps)
DEFAULT_NODE_ACCEPTANCE = (0.42, 0.11, 0.05, 0.03, 0.02, 0.015, 0.01, 0.008)
#: the largest template the adaptive mode may verify (the cost table's sizes above it are not
#: worth their cost on the 2-core CPU for any acceptance we measured)
DEFAULT_MAX_TEMPLATE = 32


def expected_tokens(acceptance: Sequence[float]) -> np.ndarray:
    """E[n] = expected emitted tokens (bonus included) of the best n-node prefix, n = 1.. len+1:
    ``1 + `` the sum of the n - 1 largest node acceptance probabilities."""
    p = np.sort(np.asarray(acceptance, dtype=np.float64))[::-1]
    return 1.0 + np.concatenate(([0.0], np.cumsum(p)))


def choose_size(cost: VerifyCost, acceptance: Sequence[float],
                sizes: Sequence[int] | None = None, margin: float = 0.0) -> int:
    """The tree size (nodes, root included) with the most expected tokens per unit of cost.

    ``acceptance`` are per-node acceptance probabilities (any order; a prefix-closed template's
    children never exceed their parents, so the n most likely nodes form a tree); ``sizes`` are
    the candidates (default: ``cost.padded_sizes()`` up to ``len(acceptance) + 1``). A tree must
    beat a plain step (size 1, gain 1) by ``margin`` (relative) to be chosen."""
    e = expected_tokens(acceptance)
    if sizes is None:
        sizes = [s for s in cost.padded_sizes() if s <= len(e)]
    best, best_gain = 1, 1.0 * (1.0 + margin)
    for n in sizes:
        if n < 2 or n > len(e):
            continue
        gain = e[n - 1] / cost.effective(n)
        if gain > best_gain:
            best, best_gain = n, gain
    return best


def default_template_size(cost: VerifyCost = CPU_2CORE_SMOLLM2,
                          acceptance: Sequence[float] = DEFAULT_NODE_ACCEPTANCE,
                          max_size: int = DEFAULT_MAX_TEMPLATE) -> int:
    """The static template size for ``cost`` (see :func:`choose_size`)."""
    pool = TreeTemplate.best_first(max_size, acceptance)
    return max(2, choose_size(cost, pool.prior[1:]))


class TokenRecycling(Drafter):
    name = "token_recycling"

    def __init__(self, k: int = 8, template: TreeTemplate | None = None,
                 template_size: int | None = None, lookup: int = 0, warm_start: bool = True,
                 adaptive: bool = True, cost: VerifyCost | None = CPU_2CORE_SMOLLM2,
                 smoothing: float = 0.1, margin: float = 0.05):
        if template is not None and template_size is not None:
            raise ValueError("give either template or template_size, not both")
        if not isinstance(lookup, int) or lookup < 0:
            raise ValueError(f"lookup must be an int >= 0 (0 = off), got {lookup!r}")
        if adaptive and cost is None:
            raise ValueError("adaptive=True needs a cost table (cost=VerifyCost(...))")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must lie in (0, 1], got {smoothing!r}")
        if template is None:
            if template_size is None:
                template_size = DEFAULT_MAX_TEMPLATE if adaptive else default_template_size(
                    cost or CPU_2CORE_SMOLLM2)
            template = TreeTemplate.best_first(template_size, DEFAULT_NODE_ACCEPTANCE)
        self.template = template
        #: > 0: also graft the prompt-lookup continuation (up to ``lookup`` tokens) of the latest
        #: earlier occurrence of the context's last 3- or 2-gram onto the tree (an extension of
        #: the paper: recycled tokens plus copied text, useful when outputs quote the prompt)
        self.lookup = lookup
        if lookup:
            from .prompt_lookup import PromptLookup
            self._lookup = PromptLookup(max_ngram=3, min_ngram=2, num_draft=lookup,
                                        adaptive=False)
        if not isinstance(k, int) or k < max(1, self.template.max_rank):
            raise ValueError(f"k must be an int >= the template's largest rank + 1 "
                             f"({self.template.max_rank}), got {k!r}")
        self.k = k
        self.warm_start, self.adaptive = warm_start, adaptive
        self.cost, self.smoothing, self.margin = cost, smoothing, margin
        self.matrix: np.ndarray | None = None
        t = self.template
        self._level_nodes = [np.array(lv) for lv in t.levels]
        self._level_parents = [np.array([t.parents[i] for i in lv]) for lv in t.levels]
        self._level_ranks = [np.array([t.ranks[i] for i in lv]) for lv in t.levels]
        self._children = t.children
        self._sizes = ([s for s in cost.padded_sizes() if s <= len(t)] if cost is not None
                       else [len(t)])
        #: live per-node acceptance estimates (node 0, the root, is always "accepted")
        self.acceptance = np.asarray(t.prior, dtype=np.float64).copy()
        self._pending: list[tuple[int, np.ndarray]] = []
        self.sizes_used: dict[int, int] = {}

    @property
    def wants_prompt_logits(self) -> bool:
        return self.warm_start

    def start(self, prompt: Sequence[int], vocab_size: int) -> None:
        if self.matrix is None or self.matrix.shape[0] != vocab_size:
            self.matrix = np.zeros((vocab_size, self.k), dtype=np.int64)
        if self.lookup:
            self._lookup.start(prompt, vocab_size)
        self._pending = []

    def prime(self, prompt: Sequence[int], logits: torch.Tensor) -> None:
        """Warm start: row ``prompt[i]`` := top-k of ``logits[i]`` (the prediction after
        ``prompt[:i + 1]``) for i < len(logits); a token's latest occurrence wins."""
        if not self.warm_start or logits is None or not len(logits):
            return
        k = min(self.k, logits.shape[-1])
        top = top_k(logits, k).cpu().numpy()
        tokens = np.asarray(prompt[:len(top)], dtype=np.int64)
        # np.unique on the reversed tokens: the first index there is the latest occurrence
        unique, last_rev = np.unique(tokens[::-1], return_index=True)
        self.matrix[unique, :k] = top[len(tokens) - 1 - last_rev]

    def reset(self) -> None:
        """Forget everything learnt (a "cold start")."""
        if self.matrix is not None:
            self.matrix[:] = 0
        self.acceptance = np.asarray(self.template.prior, dtype=np.float64).copy()
        self._pending = []

    # ------------------------------------------------------------------ drafting
    def fill(self, root: int, max_depth: int) -> np.ndarray:
        """The template's tokens from the matrix (node 0 = ``root``), levels <= max_depth."""
        t = self.template
        tokens = np.zeros(len(t), dtype=np.int64)
        tokens[0] = root
        for level in range(1, min(len(t.levels) - 1, max_depth) + 1):
            tokens[self._level_nodes[level]] = self.matrix[
                tokens[self._level_parents[level]], self._level_ranks[level]]
        return tokens

    def active_nodes(self) -> np.ndarray:
        """Template nodes to verify this step, in template (BFS) order: the root plus the
        ``n - 1`` nodes of highest estimated acceptance, n chosen by :func:`choose_size`."""
        if not self.adaptive:
            return np.arange(len(self.template))
        p = self.acceptance[1:]
        n = choose_size(self.cost, p, self._sizes, self.margin)
        # a stable sort keeps a parent (smaller index) before an equally likely child
        order = np.argsort(-p, kind="stable")[:n - 1] + 1
        return np.concatenate(([0], np.sort(order)))

    def draft(self, history: list[int], max_depth: int) -> DraftTree:
        t = self.template
        self._resolve(history)
        tokens = self.fill(history[-1], len(t.levels) - 1)
        if self.adaptive:
            self._pending.append((len(history), tokens))
        # keep active nodes within depth whose parent is kept and whose token is new among
        # the kept siblings
        keep_index = {0: 0}
        out_tokens, out_parents = [int(tokens[0])], [-1]
        seen: dict[int, set] = {0: set()}
        depth, parents = t.depth, t.parents
        for i in self.active_nodes().tolist()[1:]:
            if depth[i] > max_depth:
                continue
            parent = keep_index.get(parents[i])
            if parent is None:
                continue
            tok = int(tokens[i])
            if tok in seen[parent]:
                continue
            seen[parent].add(tok)
            keep_index[i] = len(out_tokens)
            seen[len(out_tokens)] = set()
            out_tokens.append(tok)
            out_parents.append(parent)
        self.sizes_used[len(out_tokens)] = self.sizes_used.get(len(out_tokens), 0) + 1
        if self.lookup:  # graft the copied continuation: follow matching nodes, then extend
            node = 0
            for tok in self._lookup.draft(history, max_depth).tokens[1:]:
                child = next((c for c in range(len(out_tokens))
                              if out_parents[c] == node and out_tokens[c] == tok), None)
                if child is None:
                    out_tokens.append(tok)
                    out_parents.append(node)
                    child = len(out_tokens) - 1
                node = child
        return DraftTree(out_tokens, out_parents)

    def hits(self, tokens: np.ndarray, continuation: Sequence[int]) -> list[int]:
        """Template nodes that verification would accept if the tokens after the root were
        ``continuation``: the chain of first children (BFS order) carrying the next token."""
        out, node = [], 0
        for c in continuation:
            node = next((ch for ch in self._children[node] if tokens[ch] == c), None)
            if node is None:
                break
            out.append(node)
        return out

    def _resolve(self, history: list[int]) -> None:
        """Score pending templates whose continuation is fully known (the template's depth)."""
        depth = len(self.template.levels) - 1
        keep = []
        for pos, tokens in self._pending:
            if len(history) - pos < depth:
                keep.append((pos, tokens))
                continue
            hit = self.hits(tokens, history[pos:pos + depth])
            self.acceptance *= 1.0 - self.smoothing
            self.acceptance[hit] += self.smoothing
            self.acceptance[0] = 1.0
        self._pending = keep

    def update(self, tree: DraftTree, logits: torch.Tensor, path, emitted) -> None:
        k = min(self.k, logits.shape[-1])  # a vocabulary smaller than k keeps zeros beyond
        top = top_k(logits, k).cpu().numpy()
        tokens = np.asarray(tree.tokens)
        if len(tokens) == 1:
            self.matrix[tokens[0], :k] = top[0]
            return
        # a token on several nodes: its first occurrence in BFS order (closest to the root) wins
        unique, first = np.unique(tokens, return_index=True)
        self.matrix[unique, :k] = top[first]
