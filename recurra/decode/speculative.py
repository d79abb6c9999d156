"""Train-free speculative decoding with deterministic drafts, lossless for greedy and sampling.

A :class:`Drafter` proposes a :class:`~recurra.decode.tree.DraftTree` rooted at the last token;
the model verifies every node in one pass (:meth:`DecodeSession.verify`), and the walk below
decides what is emitted:

- at node v (starting at the root) the next token y is chosen from v's processed scores exactly
  as plain decoding would choose it: argmax for greedy, one draw from the seeded generator for
  sampling (*sample-and-match*);
- y is emitted; if a child of v carries y the walk descends to it, otherwise it stops (y is the
  "bonus" token and the next root). EOS and the token budget stop it too.

Every emitted token is therefore chosen from the model's own (processed) distribution given the
true prefix, so the output has the target law; for greedy it is bit-identical to plain greedy,
and for sampling it even reproduces plain sampling under the same seed (one uniform per emitted
token, see :mod:`recurra.decode.sampling`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from ..ops.top_k import argmax
from .processors import process_tree
from .protocol import DecodeSession
from .sampling import sample_token
from .stats import DecodeStats
from .tree import DraftTree


class Drafter:
    """Proposes draft trees. Subclasses override :meth:`draft` and optionally the hooks."""

    name = "drafter"
    #: True: the prefill computes the logits of every prompt position and :meth:`prime` gets them
    wants_prompt_logits = False

    def start(self, prompt: Sequence[int], vocab_size: int) -> None:
        """Called once per generate call with the prompt."""

    def prime(self, prompt: Sequence[int], logits: torch.Tensor) -> None:
        """Called after :meth:`start` with the raw logits (len(prompt) - 1, V) of the prefill
        (row i follows ``prompt[:i + 1]``) when :attr:`wants_prompt_logits`."""

    def draft(self, history: list[int], max_depth: int) -> DraftTree:
        """A tree rooted at ``history[-1]`` (depth <= ``max_depth`` is all that can be used)."""
        return DraftTree([history[-1]], [-1])

    def update(self, tree: DraftTree, logits: torch.Tensor, path: list[int],
               emitted: list[int]) -> None:
        """Called after each verification with the raw logits of every node."""


def speculative_decode(session: DecodeSession, prompt: Sequence[int], drafter: Drafter,
                       max_new_tokens: int, eos_token_ids: Sequence[int] = (),
                       processors=None, sample: bool = False,
                       generator: torch.Generator | None = None,
                       stats: DecodeStats | None = None, vocab_size: int | None = None,
                       ) -> Iterator[list[int]]:
    """Yields the emitted tokens of every step (batch 1)."""
    stats = stats if stats is not None else DecodeStats()
    history = [int(t) for t in prompt]
    eos = {int(e) for e in eos_token_ids}
    t0 = time.perf_counter()
    want = drafter.wants_prompt_logits
    prompt_logits = None
    if len(history) > 1:
        out = session.append(torch.tensor([history[:-1]], device=_device(session)),
                             logits_to_keep=0 if want else 1)
        prompt_logits = out[0] if want else None
    drafter.start(history, vocab_size)
    if prompt_logits is not None:
        drafter.prime(history, prompt_logits)
    stats.prefill_seconds += time.perf_counter() - t0
    produced = 0
    while produced < max_new_tokens:
        budget = max_new_tokens - produced
        tree = drafter.draft(history, budget - 1)
        logits = session.verify(tree)
        scores = process_tree(processors, history, tree, logits)
        stats.steps += 1
        stats.verified_tokens += len(tree)
        stats.draft_steps += len(tree) > 1
        greedy_choice = None if sample else argmax(scores).tolist()
        node, path, emitted = 0, [0], []
        children = tree.children
        while True:
            if sample:
                y = int(sample_token(scores[node:node + 1], generator)[0])
            else:
                y = greedy_choice[node]
            emitted.append(y)
            if y in eos or len(emitted) >= budget:
                break
            nxt = next((c for c in children[node] if tree.tokens[c] == y), None)
            if nxt is None:
                break
            node = nxt
            path.append(node)
        session.commit(path)
        drafter.update(tree, logits, path, emitted)
        history.extend(emitted)
        produced += len(emitted)
        stats.new_tokens += len(emitted)
        yield emitted
        if emitted[-1] in eos:
            break


def _device(session):
    adapter = getattr(session, "adapter", None)
    return adapter.device if adapter is not None else torch.device("cpu")
