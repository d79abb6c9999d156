"""Draft token trees: the shape every speculative method hands to a verifier.

Node 0 is the root: the last committed token, not yet absorbed by the model's cache or state.
Node i > 0 has a parent (``parents[i] < i``), a depth (root = 0) and a token. Verifying a tree
runs all its nodes through the model in one pass: node i sees the committed prefix and its own
ancestors (``ancestor_mask``), at position ``prefix_length + depth[i]``.

A :class:`TreeTemplate` is a static tree shape whose nodes are *rank paths* (``(0, 1)`` = the top-1
successor of the root's top-0 successor); Token Recycling fills it from its adjacency matrix.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch


@dataclass
class DraftTree:
    """A token tree; ``parents[0] == -1`` and ``parents[i] < i`` (topological order)."""

    tokens: list[int]
    parents: list[int]
    #: (optional) the draft's proposal distribution at each node (n, V): RSD / draft models
    proposal_probs: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError(f"tokens and parents must be non-empty and of equal length, got "
                             f"{len(self.tokens)} and {len(self.parents)}")
        if self.parents[0] != -1:
            raise ValueError(f"parents[0] must be -1 (node 0 is the root), got {self.parents[0]}")
        for i, p in enumerate(self.parents[1:], 1):
            if not 0 <= p < i:
                raise ValueError(f"parents[{i}] must lie in [0, {i - 1}] (topological order), "
                                 f"got {p}")

    @classmethod
    def chain(cls, root: int, drafts: Sequence[int]) -> DraftTree:
        """A root followed by a single line of drafts (prompt lookup, draft models)."""
        return cls([int(root), *map(int, drafts)], list(range(-1, len(drafts))))

    def __len__(self) -> int:
        return len(self.tokens)

    @cached_property
    def depth(self) -> list[int]:
        depth = [0] * len(self)
        for i in range(1, len(self)):
            depth[i] = depth[self.parents[i]] + 1
        return depth

    @cached_property
    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(len(self))]
        for i in range(1, len(self)):
            kids[self.parents[i]].append(i)
        return kids

    @cached_property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def path_to(self, node: int) -> list[int]:
        """Nodes from the root to ``node`` inclusive."""
        path = []
        while node >= 0:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def ancestor_mask(self, device=None) -> torch.Tensor:
        """Bool (n, n): ``M[i, j]`` iff j is an ancestor of i or i itself."""
        n = len(self)
        mask = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            p = self.parents[i]
            if p >= 0:
                mask[i] = mask[p]
            mask[i, i] = True
        return mask.to(device) if device is not None else mask

    def padded(self, size: int) -> DraftTree:
        """The tree grown to ``size`` nodes with dummy leaves (only to reach a cheaper batch
        shape; callers ignore the logits of nodes >= len(self)). Chains stay chains."""
        if size <= len(self):
            return self
        extra = size - len(self)
        if self.is_chain:
            return DraftTree.chain(self.tokens[0], self.tokens[1:] + [self.tokens[-1]] * extra)
        return DraftTree(self.tokens + [self.tokens[0]] * extra, self.parents + [0] * extra)


# --------------------------------------------------------------------- static templates
#: default probability that the rank-r successor is right (per level, independently)
RANK_ACCEPTANCE = (0.55, 0.14, 0.07, 0.045, 0.03, 0.022, 0.017, 0.013)


@dataclass
class TreeTemplate:
    """A static tree of rank paths in BFS order (index 0 = the root, path ``()``).

    ``rank_acceptance[r]`` is the prior probability that a rank-r successor is right; a node's
    ``prior`` (its probability of being accepted) is the product along its path (ranks beyond
    the tuple: 0)."""

    paths: list[tuple[int, ...]]
    rank_acceptance: Sequence[float] = RANK_ACCEPTANCE

    def __post_init__(self):
        if not self.paths or self.paths[0] != ():
            raise ValueError("a template's first path must be () (the root)")
        index = {p: i for i, p in enumerate(self.paths)}
        if len(index) != len(self.paths):
            raise ValueError("template paths must be distinct")
        for p in self.paths[1:]:
            if p[:-1] not in index or index[p[:-1]] >= index[p]:
                raise ValueError(f"template path {p} must come after its parent {p[:-1]}")
        self.parents = [-1] + [index[p[:-1]] for p in self.paths[1:]]
        self.ranks = [-1] + [p[-1] for p in self.paths[1:]]
        self.depth = [len(p) for p in self.paths]
        self.max_rank = max(self.ranks) + 1 if len(self.paths) > 1 else 0
        #: node indices per level (level 0 = [0]); a level's parents all sit in earlier levels
        self.levels = [[i for i, d in enumerate(self.depth) if d == level]
                       for level in range(max(self.depth) + 1)]
        self.children: list[list[int]] = [[] for _ in self.paths]
        for i, p in enumerate(self.parents[1:], 1):
            self.children[p].append(i)
        acc = list(self.rank_acceptance)
        self.prior = [1.0] * len(self.paths)
        for i in range(1, len(self.paths)):
            r = self.ranks[i]
            self.prior[i] = self.prior[self.parents[i]] * (acc[r] if r < len(acc) else 0.0)

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def best_first(cls, size: int, rank_acceptance: Sequence[float] = RANK_ACCEPTANCE,
                   max_depth: int = 8) -> TreeTemplate:
        """The ``size``-node tree (root included) with the largest expected accepted length when
        the rank-r successor is right with probability ``rank_acceptance[r]`` independently per
        level: keeps the ``size - 1`` rank paths of highest probability (a product along the
        path, so every chosen path's parent is chosen too). Skewed towards rank 0 like the
        Token Recycling paper's hand-made "2.2.2" tree."""
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int (nodes including the root), got {size!r}")
        probs = list(rank_acceptance)
        chosen: list[tuple[float, tuple[int, ...]]] = [(1.0, ())]
        heap = [(-probs[r], (r,)) for r in range(len(probs))]
        heapq.heapify(heap)
        while len(chosen) < size and heap:
            neg, path = heapq.heappop(heap)
            chosen.append((-neg, path))
            if len(path) < max_depth:
                for r in range(len(probs)):
                    heapq.heappush(heap, (neg * probs[r], path + (r,)))
        paths = sorted((p for _, p in chosen), key=lambda p: (len(p), p))
        return cls(paths, tuple(probs))
