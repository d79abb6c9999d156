"""Speculative decoding with a draft model: Leviathan et al. (chain) and RSD (trees).

- ``method="draft"``: the draft model proposes ``num_draft`` tokens autoregressively (sampled
  from its processed distribution q, or argmax for greedy); the target verifies the chain in one
  pass; sampling accepts with speculative sampling (:mod:`recurra.decode.rejection`).
- ``method="rsd"`` (Recursive Speculative Decoding, Jeon et al., arXiv 2402.14160): the draft
  proposes a tree whose siblings are drawn *without replacement* — ``tree="gumbel"`` (RSD-C):
  each node at level l gets ``branching[l]`` children by Gumbel-top-k of log q;
  ``tree="beam"`` (RSD-S): stochastic beam search (Kool et al. 2019) of width ``beam_width``
  and depth ``len(branching)``. The target verifies the tree in one pass and recursive
  rejection sampling walks it. For greedy decoding the draft tree is deterministic (top-k of q)
  and the walk is the engine's exact-match walk.

The draft session follows the target: after each step it is restored to its committed point and
absorbs the accepted path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..ops.top_k import argmax
from .processors import process_tree
from .rejection import rrs_sample
from .stats import DecodeStats
from .tree import DraftTree


def _probs(processors, history, tree, logits):
    return torch.softmax(process_tree(processors, history, tree, logits).double(), dim=-1)


def _chain_draft(draft, history, depth, processors, sample, generator):
    """Autoregressive chain from the draft session; returns tree (with q per node), snapshots."""
    tokens, q_rows = [history[-1]], []
    snaps = [draft.snapshot()]
    for d in range(depth):
        tree = DraftTree([tokens[-1]], [-1])
        logits = draft.verify(tree)
        draft.commit([0])
        snaps.append(draft.snapshot())
        q = _probs(processors, history + tokens[1:], tree, logits)[0]
        q_rows.append(q)
        if sample:
            from .sampling import sample_from_probs
            tokens.append(int(sample_from_probs(q[None], generator)[0]))
        else:
            tokens.append(int(q.argmax()))
    tree = DraftTree.chain(tokens[0], tokens[1:])
    if q_rows:
        tree.proposal_probs = torch.stack(q_rows + [q_rows[-1]])  # the leaf's row is unused
    return tree, snaps


def _gumbel(shape, generator):
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp_min(1e-300)
    return -torch.log(-torch.log(u))


def _tree_draft(draft, history, branching, processors, sample, generator, kind, beam_width):
    """RSD draft tree grown level by level (the draft re-verifies the tree per level)."""
    tokens, parents = [history[-1]], [-1]
    frontier = [0]
    q_rows: dict[int, torch.Tensor] = {}
    gumbel_of = {0: 0.0}      # RSD-S: the (truncated) perturbed log-probability of each node
    logq_of = {0: 0.0}
    for level, width in enumerate(branching):
        tree = DraftTree(list(tokens), list(parents))
        logits = draft.verify(tree)
        draft.commit([])
        probs = _probs(processors, history, tree, logits)
        for v in frontier:
            q_rows[v] = probs[v]
        new_frontier = []
        if kind == "gumbel" or not sample:
            for v in frontier:
                logq = probs[v].log()
                keys = logq + _gumbel(logq.shape, generator) if sample else logq
                k = min(width, int((probs[v] > 0).sum()))
                for c in torch.topk(keys, k).indices.tolist():
                    tokens.append(c)
                    parents.append(v)
                    new_frontier.append(len(tokens) - 1)
        else:  # stochastic beam search: top beam_width over the children of all beams
            cands = []
            for v in frontier:
                logq = probs[v].log()
                phi = logq_of[v] + logq
                g = phi + _gumbel(phi.shape, generator)
                z = g.max()
                gt = -torch.log(torch.exp(-torch.tensor(gumbel_of[v], dtype=torch.float64))
                                - torch.exp(-z) + torch.exp(-g))
                for c in torch.nonzero(probs[v] > 0).flatten().tolist():
                    cands.append((float(gt[c]), v, c, float(phi[c])))
            cands.sort(key=lambda x: -x[0])
            for gt, v, c, phi in sorted(cands[:beam_width], key=lambda x: (x[1], -x[0])):
                tokens.append(c)
                parents.append(v)
                node = len(tokens) - 1
                gumbel_of[node], logq_of[node] = gt, phi
                new_frontier.append(node)
        frontier = new_frontier
    tree = DraftTree(tokens, parents)
    vocab = next(iter(q_rows.values())).shape[0]
    tree.proposal_probs = torch.stack([q_rows.get(i, torch.zeros(vocab, dtype=torch.float64))
                                       for i in range(len(tokens))])
    return tree


@torch.no_grad()
def draft_model_decode(target, draft, prompt: Sequence[int], max_new_tokens: int,
                       eos_token_ids=(), processors=None, sample=False, generator=None,
                       stats: DecodeStats | None = None, method: str = "draft",
                       num_draft: int = 4, branching: Sequence[int] = (2, 2, 1),
                       tree: str = "gumbel", beam_width: int = 3, rejection=rrs_sample):
    """Yields emitted tokens per step. ``target`` and ``draft`` are adapters sharing a vocabulary.
    ``rejection`` is the acceptance rule (default: recursive rejection sampling)."""
    if method not in ("draft", "rsd"):
        raise ValueError(f"method must be 'draft' or 'rsd', got {method!r}")
    if tree not in ("gumbel", "beam"):
        raise ValueError(f"tree must be 'gumbel' (RSD-C) or 'beam' (RSD-S), got {tree!r}")
    if target.vocab_size != draft.vocab_size:
        raise ValueError(f"draft model vocabulary ({draft.vocab_size}) must equal the target's "
                         f"({target.vocab_size})")
    stats = stats if stats is not None else DecodeStats()
    eos = {int(e) for e in eos_token_ids}
    history = [int(t) for t in prompt]
    t_session, d_session = target.new_session(), draft.new_session()
    t0 = time.perf_counter()
    if len(history) > 1:
        head = torch.tensor([history[:-1]], device=target.device)
        t_session.append(head, logits_to_keep=1)
        d_session.append(head.to(draft.device), logits_to_keep=1)
    stats.prefill_seconds += time.perf_counter() - t0
    produced = 0
    while produced < max_new_tokens:
        budget = max_new_tokens - produced
        snaps = None
        if method == "draft":
            tree_, snaps = _chain_draft(d_session, history, min(num_draft, budget - 1),
                                        processors, sample, generator)
        else:
            levels = list(branching)[:max(0, budget - 1)]
            if levels:
                tree_ = _tree_draft(d_session, history, levels, processors, sample, generator,
                                    tree, beam_width)
            else:
                tree_ = DraftTree([history[-1]], [-1])
        logits = t_session.verify(tree_)
        scores = process_tree(processors, history, tree_, logits)
        stats.steps += 1
        stats.verified_tokens += len(tree_)
        stats.draft_steps += len(tree_) > 1
        node, path, emitted = 0, [0], []
        while True:
            kids = tree_.children[node]
            if sample:
                p = torch.softmax(scores[node].double(), dim=-1)
                if kids:
                    y, j = rejection(p, tree_.proposal_probs[node],
                                     [tree_.tokens[c] for c in kids], generator)
                    nxt = kids[j] if j is not None else None
                else:
                    from .sampling import sample_from_probs
                    y, nxt = int(sample_from_probs(p[None], generator)[0]), None
            else:
                y = int(argmax(scores[node]))
                nxt = next((c for c in kids if tree_.tokens[c] == y), None)
            emitted.append(y)
            if y in eos or len(emitted) >= budget or nxt is None:
                break
            node = nxt
            path.append(node)
        t_session.commit(path)
        # the draft follows: back to its committed point, then absorb the accepted path
        if snaps is not None and len(path) < len(snaps):
            d_session.restore(snaps[len(path)])
        elif snaps is not None:  # every draft accepted: the last one is not absorbed yet
            d_session.restore(snaps[-1])
            d_session.append(torch.tensor([[tree_.tokens[path[-1]]]], device=draft.device))
        else:
            d_session.append(torch.tensor([[tree_.tokens[i] for i in path]],
                                          device=draft.device))
        history.extend(emitted)
        produced += len(emitted)
        stats.new_tokens += len(emitted)
        yield emitted
        if emitted[-1] in eos:
            break
