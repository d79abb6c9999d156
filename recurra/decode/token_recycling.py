"""Token Recycling (Luo et al., arXiv 2408.08696): recycle the model's own top-k predictions.

An adjacency matrix ``A`` (V x k) stores, for every token, the top-k next tokens the model
predicted the last time that token was a draft-tree node. ``A`` is kept across calls ("hot
start": it is a property of the model, not of the prompt). The paper, each step:

1. fill a static :class:`~recurra.decode.tree.TreeTemplate` breadth-first:
   ``token[node] = A[token[parent], rank[node]]`` (one gather per level);
2. drop a node whose token repeats an earlier sibling's (with its subtree) and nodes deeper than
   the remaining budget; the model verifies the tree in one pass;
3. after verification, every node's row is overwritten with the top-k of its logits, rejected
   branches included (the first occurrence of a token wins).

That is ``tree="template"`` here (with ``lookup=0``). Our additions, all lossless (the
verification walk decides every token) and each measured in ``recurra bench decode``
(docs/decoding.md):

- **warm start** (``warm_start=True``): the prefill computes the logits of every prompt position
  anyway, so row ``prompt[i]`` is set to the top-k of position i's logits (the latest occurrence
  of a token wins) before the first step: the matrix knows the prompt's own vocabulary and
  phrasing instead of starting cold.
- **dynamic trees** (``tree="dynamic"``, the default). With every successor the matrix also
  keeps the probability the model gave it, the token that preceded the row's token and the call
  that wrote the row; the same record is also kept per two- and three-token context (the
  token with the one or two tokens before it), so a context seen before gets its own successors
  back rather than whichever context wrote the token's row last (the longest known context
  wins). A candidate child's chance of being the next token, given that its parent is, is read
  from an :class:`~recurra.decode.acceptance.AcceptanceCalibration` by bucket (recorded
  probability; how many preceding tokens match the record's: 0, 1 or 2; recorded in this call
  or earlier), and a node's chance of being accepted is the product along its path. The tree grows
  best-first by that product up to ``max_nodes`` (so it goes deep where the model was sure and
  wide where it was not), and each step verifies the prefix of that order that maximises
  expected tokens per unit of verify cost (:func:`choose_size` with the measured
  :class:`~recurra.decode.cost_model.VerifyCost`; a plain step when no tree pays). The
  calibration learns from hindsight: after each step, every candidate child of a node on the
  path the text actually took is a trial, a hit if it carries the next token.
- **copied text** (``lookup``, 8 by default with dynamic trees): the prompt-lookup continuation
  of the latest earlier occurrence of the context's last 3- or 2-gram joins the candidates as a
  chain with its own calibrated buckets (by depth), so outputs that quote the prompt or repeat
  themselves are drafted too.
- **template mode's sizes** (``tree="template"``): the template keeps the nodes most likely to be
  accepted (:meth:`TreeTemplate.best_first`) and, with ``adaptive=True``, every step's full
  template is scored in hindsight against the tokens emitted next; an exponential moving average
  per node gives live estimates, and each step verifies the prefix (nodes by estimate) that
  maximises expected tokens per unit of cost. :data:`DEFAULT_NODE_ACCEPTANCE` is only the prior
  of those estimates.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np
import torch

from ..ops.top_k import top_k, top_k_probabilities
from .acceptance import AcceptanceCalibration, confidence_bins, lookup_bucket, recycled_bucket
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
#: the most nodes a dynamic tree considers (root included; the cost table decides how many of
#: them are verified)
DEFAULT_MAX_NODES = 24
#: copied tokens a dynamic tree may draft by default (``lookup``)
DEFAULT_LOOKUP = 8
#: the context records are forgotten when they pass this many (memory bound)
MAX_CONTEXT_ROWS = 1 << 20


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

    def __init__(self, k: int = 8, tree: str | None = None, template: TreeTemplate | None = None,
                 template_size: int | None = None, max_nodes: int = DEFAULT_MAX_NODES,
                 lookup: int | None = None, warm_start: bool = True, adaptive: bool = True,
                 cost: VerifyCost | None = CPU_2CORE_SMOLLM2, smoothing: float = 0.1,
                 margin: float = 0.05, calibration: AcceptanceCalibration | None = None):
        if tree is None:
            tree = "template" if template is not None or template_size is not None else "dynamic"
        if tree not in ("dynamic", "template"):
            raise ValueError(f"tree must be 'dynamic' or 'template', got {tree!r}")
        if template is not None and template_size is not None:
            raise ValueError("give either template or template_size, not both")
        if tree == "dynamic" and (template is not None or template_size is not None):
            raise ValueError("template and template_size belong to tree='template'")
        if not isinstance(max_nodes, int) or max_nodes < 1:
            raise ValueError(f"max_nodes must be an int >= 1 (root included), got {max_nodes!r}")
        if lookup is None:
            lookup = DEFAULT_LOOKUP if tree == "dynamic" else 0
        if not isinstance(lookup, int) or lookup < 0:
            raise ValueError(f"lookup must be an int >= 0 (0 = off), got {lookup!r}")
        if adaptive and cost is None:
            raise ValueError("adaptive=True needs a cost table (cost=VerifyCost(...))")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must lie in (0, 1], got {smoothing!r}")
        self.tree = tree
        if template is None:
            if template_size is None:
                template_size = DEFAULT_MAX_TEMPLATE if adaptive else default_template_size(
                    cost or CPU_2CORE_SMOLLM2)
            template = TreeTemplate.best_first(template_size, DEFAULT_NODE_ACCEPTANCE)
        self.template = template
        #: > 0: also draft the prompt-lookup continuation (up to ``lookup`` tokens) of the latest
        #: earlier occurrence of the context's last 3- or 2-gram (an extension of the paper:
        #: recycled tokens plus copied text, useful when outputs quote the prompt); template
        #: mode grafts it onto the filled template, dynamic mode makes it candidates
        self.lookup = lookup
        if lookup:
            from .prompt_lookup import PromptLookup
            self._lookup = PromptLookup(max_ngram=3, min_ngram=2, num_draft=lookup,
                                        adaptive=False)
        if tree == "template" and (not isinstance(k, int) or k < max(1, template.max_rank)):
            raise ValueError(f"k must be an int >= the template's largest rank + 1 "
                             f"({template.max_rank}), got {k!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an int >= 1, got {k!r}")
        self.k = k
        self.max_nodes = max_nodes
        self.warm_start, self.adaptive = warm_start, adaptive
        self.cost, self.smoothing, self.margin = cost, smoothing, margin
        self.matrix: np.ndarray | None = None
        #: dynamic trees: the probability the model gave each stored successor, the token that
        #: preceded the row's token when the row was written (-1: unknown) and the call that
        #: wrote it (-1: never); the same per two- and three-token context in ``context_rows``
        self.confidence: np.ndarray | None = None
        self.row_previous: np.ndarray | None = None
        self.row_call: np.ndarray | None = None
        self.context_rows: dict[tuple, tuple] = {}  # context -> (succ, probs, bins, call)
        self.calibration = calibration if calibration is not None else AcceptanceCalibration()
        self.calls = 0
        t = self.template
        self._level_nodes = [np.array(lv) for lv in t.levels]
        self._level_parents = [np.array([t.parents[i] for i in lv]) for lv in t.levels]
        self._level_ranks = [np.array([t.ranks[i] for i in lv]) for lv in t.levels]
        self._children = t.children
        top = len(t) if tree == "template" else max_nodes
        self._sizes = ([s for s in cost.padded_sizes() if s <= top] if cost is not None
                       else [top])
        self._size_set = set(self._sizes)
        #: live per-node acceptance estimates of the template (node 0, the root, is always
        #: "accepted")
        self.acceptance = np.asarray(t.prior, dtype=np.float64).copy()
        self._pending: list = []
        self._root_previous = self._root_before = -1
        self.sizes_used: dict[int, int] = {}

    @property
    def wants_prompt_logits(self) -> bool:
        return self.warm_start

    def start(self, prompt: Sequence[int], vocab_size: int) -> None:
        if self.matrix is None or self.matrix.shape[0] != vocab_size:
            self.matrix = np.zeros((vocab_size, self.k), dtype=np.int64)
            self.confidence = np.zeros((vocab_size, self.k), dtype=np.float32)
            self.row_previous = np.full(vocab_size, -1, dtype=np.int64)
            self.row_call = np.full(vocab_size, -1, dtype=np.int64)
            self._bins = np.zeros((vocab_size, self.k), dtype=np.int64)
            self.context_rows = {}
        if self.lookup:
            self._lookup.start(prompt, vocab_size)
        self._pending = []
        self.calls += 1

    def prime(self, prompt: Sequence[int], logits: torch.Tensor) -> None:
        """Warm start: row ``prompt[i]`` := top-k of ``logits[i]`` (the prediction after
        ``prompt[:i + 1]``) for i < len(logits); a token's latest occurrence wins."""
        if not self.warm_start or logits is None or not len(logits):
            return
        k = min(self.k, logits.shape[-1])
        tokens = np.asarray(prompt[:len(logits)], dtype=np.int64)
        if self.tree == "dynamic":
            previous = np.concatenate(([-1], tokens[:-1]))
            before = np.concatenate(([-1], previous[:-1]))
            top, probs = self._recorded(logits, k)
            # stored in reverse: the first occurrence there is the latest in the prompt
            self._store(tokens[::-1], previous[::-1], before[::-1], top[::-1], probs[::-1])
            return
        top = top_k(logits, k).cpu().numpy()
        # np.unique on the reversed tokens: the first index there is the latest occurrence
        unique, last_rev = np.unique(tokens[::-1], return_index=True)
        self.matrix[unique, :k] = top[len(tokens) - 1 - last_rev]

    def reset(self) -> None:
        """Forget everything learnt (a "cold start")."""
        if self.matrix is not None:
            self.matrix[:] = 0
            self.confidence[:] = 0
            self._bins[:] = 0
            self.row_previous[:] = -1
            self.row_call[:] = -1
        self.context_rows = {}
        self.calibration.reset()
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
        self._root_previous = history[-2] if len(history) > 1 else -1
        self._root_before = history[-3] if len(history) > 2 else -1
        if self.tree == "dynamic":
            return self._draft_dynamic(history, max_depth)
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
        tokens = np.asarray(tree.tokens)
        if self.tree == "dynamic":
            parents = np.asarray(tree.parents)
            up = np.maximum(parents, 0)
            previous = np.where(parents >= 0, tokens[up], self._root_previous)
            before = np.where(parents >= 0, previous[up], self._root_before)
            self._store(tokens, previous, before, *self._recorded(logits, k))
            return
        top = top_k(logits, k).cpu().numpy()
        if len(tokens) == 1:
            self.matrix[tokens[0], :k] = top[0]
            return
        # a token on several nodes: its first occurrence in BFS order (closest to the root) wins
        unique, first = np.unique(tokens, return_index=True)
        self.matrix[unique, :k] = top[first]

    # ------------------------------------------------------------------ dynamic trees
    @staticmethod
    def _recorded(logits: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(top-k indices, their softmax probabilities) of every row, as arrays."""
        top, probs = top_k_probabilities(logits, k)
        return top.cpu().numpy(), probs.to(torch.float32).cpu().numpy()

    def _store(self, tokens: np.ndarray, previous: np.ndarray, before: np.ndarray,
               top: np.ndarray, probs: np.ndarray) -> None:
        """Record each node's top-k successors with their probabilities: in its token's row,
        under its two-token context (previous, token) and under its three-token context
        (before, previous, token); where a row or a context occurs several times, the first
        occurrence wins."""
        k = top.shape[-1]
        unique, first = np.unique(tokens, return_index=True)
        bins = confidence_bins(probs)
        self.matrix[unique, :k] = top[first]
        self.confidence[unique, :k] = probs[first]
        self._bins[unique, :k] = bins[first]
        self.row_previous[unique] = previous[first]
        self.row_call[unique] = self.calls
        if len(self.context_rows) > MAX_CONTEXT_ROWS:
            self.context_rows = {}
        rows, call = self.context_rows, self.calls
        tokens, previous, before = tokens.tolist(), previous.tolist(), before.tolist()
        for i in range(len(tokens) - 1, -1, -1):  # backwards: the first occurrence is last
            record = (top[i], probs[i], bins[i], call)
            rows[(previous[i], tokens[i])] = record
            rows[(before[i], previous[i], tokens[i])] = record

    def successors(self, token: int, previous: int, before: int = -1):
        """(tokens, recorded probabilities, bucket indices) of ``token``'s recycled successors
        after ``before, previous``: the three-token context's record if there is one, else the
        two-token context's, else the token's row; None if none was ever recorded."""
        for context, key in ((2, (before, previous, token)), (1, (previous, token))):
            record = self.context_rows.get(key)
            if record is not None:
                succ, conf, bins, call = record
                return succ, conf, recycled_bucket(context, call == self.calls, bins)
        call = self.row_call[token]
        if call < 0:
            return None
        same = int(self.row_previous[token] == previous)
        # copies: the row may be overwritten before the hindsight walk reads these candidates
        return (self.matrix[token].copy(), self.confidence[token].copy(),
                recycled_bucket(same, call == self.calls, self._bins[token]))

    def _draft_dynamic(self, history: list[int], max_depth: int) -> DraftTree:
        """Best-first: grow the tree by the candidate of highest estimated acceptance (the
        product of calibrated hit rates along its path) up to ``max_nodes``, then verify the
        prefix of that order that maximises expected tokens per unit of cost."""
        self._observe(history)
        rates = self.calibration.rates()
        tokens, parents, score, depth = [history[-1]], [-1], [1.0], [0]
        previous, before = [self._root_previous], [self._root_before]
        children: list = []  # per node: (child tokens, their buckets) or None (not expanded)
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        heap: list = []
        copied = self._lookup.draft(history, max_depth).tokens[1:] if self.lookup else []
        ngram = self._lookup.last_n if copied else 0
        counter = 0

        def expand(i: int) -> None:
            nonlocal counter
            if depth[i] >= max_depth:
                children.append(None)
                return
            found = self.successors(tokens[i], previous[i], before[i])
            if found is not None:
                kid_tokens, _, kid_buckets = found
            else:
                kid_tokens = kid_buckets = np.zeros(0, dtype=np.int64)
            if (i == 0 or i in chain_nodes) and depth[i] < len(copied):
                kid_tokens = np.append(kid_tokens, copied[depth[i]])
                kid_buckets = np.append(kid_buckets, lookup_bucket(depth[i] + 1, ngram))
            if not len(kid_tokens):
                children.append(None)
                return
            neg = (-score[i] * rates[kid_buckets]).tolist()
            for s, tok in zip(neg, kid_tokens.tolist()):
                counter += 1
                heapq.heappush(heap, (s, counter, i, tok))
            children.append((kid_tokens, kid_buckets))

        chain_nodes: set[int] = set()
        expand(0)
        # stop early once no larger tree can beat the best so far: n >= m + 2 nodes emit at most
        # 1 + total + (max_nodes - 1 - m) * (the best score left), at a cost >= eff(m + 2)
        eff = self.cost.effective if self.adaptive else None
        best, total = 1.0 + self.margin, 0.0
        while heap and len(tokens) < self.max_nodes:
            if eff is not None:
                m = len(tokens) - 1
                if (1.0 + total + (self.max_nodes - 1 - m) * -heap[0][0]) / eff(m + 2) <= best:
                    break
            neg, _, p, tok = heapq.heappop(heap)
            if (p, tok) in index:  # the same token under the same parent: keep the first
                continue
            if eff is not None:
                total -= neg
                if len(tokens) + 1 in self._size_set:  # a size choose_size may pick
                    best = max(best, (1.0 + total) / eff(len(tokens) + 1))
            i = len(tokens)
            index[(p, tok)] = i
            tokens.append(tok)
            parents.append(p)
            score.append(-neg)
            depth.append(depth[p] + 1)
            previous.append(tokens[p])
            before.append(previous[p])
            if copied and (p == 0 or p in chain_nodes) and depth[i] <= len(copied) and \
                    copied[depth[i] - 1] == tok:
                chain_nodes.add(i)
            expand(i)
        self._pending.append(_Candidates(len(history), children, index))
        if self.adaptive:
            n = choose_size(self.cost, np.asarray(score[1:]), self._sizes, self.margin)
        else:
            n = len(tokens)
        self.sizes_used[n] = self.sizes_used.get(n, 0) + 1
        return DraftTree(tokens[:n], parents[:n])

    def _observe(self, history: list[int]) -> None:
        """Feed the calibration: walk each pending candidate tree along the tokens emitted
        since it was drafted; at every node on the true path, each candidate child is a trial
        (a hit if it carries the next token)."""
        keep = []
        for cand in self._pending:
            done = False
            while cand.position < len(history):
                kids = cand.children[cand.node]  # every node of the tree was expanded
                if kids is None:
                    done = True
                    break
                nxt = history[cand.position]
                self.calibration.observe(kids[1], kids[0] == nxt)
                node = cand.index.get((cand.node, nxt))
                if node is None:
                    done = True
                    break
                cand.node, cand.position = node, cand.position + 1
            if not done:
                keep.append(cand)
        self._pending = keep


class _Candidates:
    """A drafted candidate tree awaiting its hindsight walk (see TokenRecycling._observe)."""

    __slots__ = ("children", "index", "node", "position")

    def __init__(self, position, children, index):
        self.position, self.children, self.index, self.node = position, children, index, 0
