"""Plain autoregressive decoding (greedy and sampling) for a batch of equal-length prompts."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from ..ops.top_k import argmax
from .protocol import DecodeSession
from .sampling import sample_token
from .stats import DecodeStats


def autoregressive_decode(session: DecodeSession, input_ids: torch.Tensor, max_new_tokens: int,
                          eos_token_ids: Sequence[int] = (), pad_token_id: int = 0,
                          processors=None, sample: bool = False,
                          generator: torch.Generator | None = None,
                          stats: DecodeStats | None = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every row (B,) per step; finished rows get ``pad_token_id``."""
    stats = stats if stats is not None else DecodeStats()
    t0 = time.perf_counter()
    logits = session.append(input_ids, logits_to_keep=1)[:, -1]
    stats.prefill_seconds += time.perf_counter() - t0
    sequences = input_ids
    eos = torch.tensor(sorted({int(e) for e in eos_token_ids}), dtype=torch.long,
                       device=input_ids.device)
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for t in range(max_new_tokens):
        scores = processors(sequences, logits.clone()) if processors else logits
        token = sample_token(scores, generator) if sample else argmax(scores)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        yield token
        stats.new_tokens += 1
        finished |= torch.isin(token, eos)
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        sequences = torch.cat((sequences, token[:, None]), dim=1)
        logits = session.append(token[:, None])[:, -1]
        stats.steps += 1
        stats.verified_tokens += 1
    # the first token came from the prefill: count it as one step
    stats.steps += 1
