"""Token Recycling (Luo et al., arXiv 2408.08696): recycle the model's own top-k predictions.

An adjacency matrix ``A`` (V x k) stores, for every token, the top-k next tokens the model
predicted the last time that token was a draft-tree node. ``A`` starts as zeros and is kept
across calls ("hot start": it is a property of the model, not of the prompt). Each step:

1. fill a static :class:`~recurra.decode.tree.TreeTemplate` breadth-first:
   ``token[node] = A[token[parent], rank[node]]`` (one gather per level);
2. drop a node whose token repeats an earlier sibling's (with its subtree) and nodes deeper than
   the remaining budget; the model verifies the tree in one pass;
3. after verification, every node's row is overwritten with the top-k of its logits, rejected
   branches included (the first occurrence of a token in BFS order wins).

The template size is the knob that trades accepted tokens against verification cost; the
default (:data:`DEFAULT_TEMPLATE_SIZE`) is chosen from the measured cost of verifying k tokens on
the project's CPU machines (see docs/decoding.md and ``recurra bench decode --sweep-tr``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .speculative import Drafter
from .tree import DraftTree, TreeTemplate

#: nodes (root included) of the default template, chosen from the 2-core CPU's verify costs:
#: 8 tokens cost about 1.6 single steps there, 16 about 1.95, 32 about 2.8 (docs/decoding.md)
DEFAULT_TEMPLATE_SIZE = 16


class TokenRecycling(Drafter):
    name = "token_recycling"

    def __init__(self, k: int = 8, template: TreeTemplate | None = None,
                 template_size: int | None = None, lookup: int = 0):
        if template is not None and template_size is not None:
            raise ValueError("give either template or template_size, not both")
        if not isinstance(lookup, int) or lookup < 0:
            raise ValueError(f"lookup must be an int >= 0 (0 = off), got {lookup!r}")
        self.template = template or TreeTemplate.best_first(
            template_size or DEFAULT_TEMPLATE_SIZE)
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
        self.matrix: np.ndarray | None = None
        t = self.template
        self._level_nodes = [np.array(lv) for lv in t.levels]
        self._level_parents = [np.array([t.parents[i] for i in lv]) for lv in t.levels]
        self._level_ranks = [np.array([t.ranks[i] for i in lv]) for lv in t.levels]

    def start(self, prompt: Sequence[int], vocab_size: int) -> None:
        if self.matrix is None or self.matrix.shape[0] != vocab_size:
            self.matrix = np.zeros((vocab_size, self.k), dtype=np.int64)
        if self.lookup:
            self._lookup.start(prompt, vocab_size)

    def reset(self) -> None:
        """Forget everything learnt (a "cold start")."""
        if self.matrix is not None:
            self.matrix[:] = 0

    def draft(self, history: list[int], max_depth: int) -> DraftTree:
        t = self.template
        tokens = np.empty(len(t), dtype=np.int64)
        tokens[0] = history[-1]
        for level in range(1, min(len(t.levels) - 1, max_depth) + 1):
            nodes = self._level_nodes[level]
            tokens[nodes] = self.matrix[tokens[self._level_parents[level]],
                                        self._level_ranks[level]]
        # keep nodes within depth whose parent is kept and whose token is new among siblings
        keep_index = {0: 0}
        out_tokens, out_parents = [int(tokens[0])], [-1]
        seen: dict[int, set] = {0: set()}
        for i in range(1, len(t)):
            if t.depth[i] > max_depth:
                continue
            parent = keep_index.get(t.parents[i])
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

    def update(self, tree: DraftTree, logits: torch.Tensor, path, emitted) -> None:
        k = min(self.k, logits.shape[-1])  # a vocabulary smaller than k keeps zeros beyond
        top = logits.topk(k, dim=-1).indices.cpu().numpy()
        tokens = np.asarray(tree.tokens)
        # a token on several nodes: its first occurrence in BFS order (closest to the root) wins
        unique, first = np.unique(tokens, return_index=True)
        self.matrix[unique, :k] = top[first]
