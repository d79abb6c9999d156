"""The indices of the k largest entries of each row, for a few long rows (C++).

Token Recycling keeps, for every token, the top-k next tokens the model last predicted: after
each verification it takes the top-k (k of about 8) of every draft node's logits over the whole
vocabulary. ``torch.topk`` sorts far more than that needs (on the 2-core machine about 0.2 ms per
49152-entry row, 0.6-0.7 ms per 8-node tree: a few percent of a SmolLM2 step);
``csrc/top_k.cpp`` makes one pass per row, comparing the lane-wise maximum of four vectors of
entries at a time against the current k-th value and inserting the rare entry that beats it into
a sorted list of k (23 us per row on the 2-core machine).

Order: by value, descending; among equal values the lower index first (what a stable
descending sort gives: :func:`top_k_reference`, which the tests hold the kernel to, and which
runs where the kernel cannot: gradients needed, other devices or dtypes, or the extension not
built, which warns once).
"""

from __future__ import annotations

import torch

from . import chunked_scan_compiled


def top_k_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of each row's k largest entries by a stable descending sort."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def top_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (..., k) of the k largest entries of each row of ``x`` (..., n), 1 <= k <= n,
    ordered as :func:`top_k_reference` orders them (module docstring)."""
    if not isinstance(k, int) or not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k must be an int in [1, {x.shape[-1]}] (the rows' length), got {k!r}")
    if x.numel() == 0 or not chunked_scan_compiled.serves("auto", x):
        return top_k_reference(x, k)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    out = chunked_scan_compiled.EXTENSION.load().top_k_rows(rows, k)
    return out.view(*x.shape[:-1], k)


def top_k_probabilities_reference(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, probabilities) (..., k): :func:`top_k_reference` and the chosen entries'
    softmax probabilities over their rows."""
    idx = top_k_reference(x, k)
    return idx, torch.softmax(x, dim=-1).gather(-1, idx)


def top_k_probabilities(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`top_k` and the chosen entries' softmax probabilities over their rows, in x's dtype,
    to about 2e-5 relative: the kernel sums the exponentials with a degree-6 vector exp (twice
    as fast as a full-precision one; drafters use these probabilities as features, never to
    choose an output token)."""
    if not isinstance(k, int) or not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k must be an int in [1, {x.shape[-1]}] (the rows' length), got {k!r}")
    if x.numel() == 0 or not chunked_scan_compiled.serves("auto", x):
        return top_k_probabilities_reference(x, k)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    idx, probs = chunked_scan_compiled.EXTENSION.load().top_k_probs_rows(rows, k)
    return idx.view(*x.shape[:-1], k), probs.view(*x.shape[:-1], k)


def argmax(x: torch.Tensor) -> torch.Tensor:
    """The index (...) of each row's largest entry of ``x`` (..., n), the lowest index among
    equal maxima: what ``x.argmax(-1)`` gives for rows without NaN, in one C++ pass
    (a lane-parallel pass; torch's CPU argmax is several times slower on a few long rows).
    Greedy decoding and speculative verification both choose tokens with it, so they agree bit
    for bit whatever the rows hold."""
    if x.numel() == 0 or not chunked_scan_compiled.serves("auto", x):
        return x.argmax(-1)
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    return chunked_scan_compiled.EXTENSION.load().argmax_rows(rows).view(x.shape[:-1])
