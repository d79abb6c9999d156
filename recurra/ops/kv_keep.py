"""Commit an accepted draft path in a KV cache: its slots move to consecutive slots, the rest go.

A cache is a tuple of per-layer ``(k, v)`` tensors of shape (B, H, S, D) (any strides: the
compiled Llama forward returns keys as a transposed view). Verifying a draft tree appended all
its nodes at slots ``start ..``; the accepted path (node indices, rising, root first) must end
up at ``start, start + 1, ..`` and the cache be cropped there. :func:`keep_slots_reference` does
it with torch indexing (two ops and a slice per tensor: about 0.4 ms of dispatch for 30 layers);
``csrc/kv_keep.cpp`` does all tensors in one call. Both move slots in place, in the tensors
given: the caller must own them (a session owns the cache its last verify returned).
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch

from . import chunked_scan_compiled


def _moves(start: int, path: Sequence[int]) -> tuple[list[int], list[int]]:
    moved = [(start + j, start + int(p)) for j, p in enumerate(path) if int(p) != j]
    return [d for d, _ in moved], [s for _, s in moved]


def keep_slots_reference(cache, start: int, path: Sequence[int]):
    """The torch version of :func:`keep_slots`."""
    dst, src = _moves(start, path)
    length = start + len(path)
    out = []
    for k, v in cache:
        if dst:
            d = torch.tensor(dst, device=k.device)
            s = torch.tensor(src, device=k.device)
            k.index_copy_(2, d, k.index_select(2, s))
            v.index_copy_(2, d, v.index_select(2, s))
        out.append((k[:, :, :length], v[:, :, :length]))
    return tuple(out)


def keep_slots(cache, start: int, path: Sequence[int]):
    """Move slots ``start + path[j]`` to ``start + j`` in place and crop every tensor to
    ``start + len(path)`` slots. ``path`` rises from 0 (a root-to-node path of a tree whose
    nodes sit in topological order); returns the cropped cache, or ``cache`` itself when there
    is nothing to move or crop."""
    if not cache:
        return cache
    path = [int(p) for p in path]
    if any(b <= a for a, b in pairwise(path)) or (path and path[0] != 0):
        raise ValueError(f"path must rise from node 0 (a root-to-node path), got {path}")
    length = start + len(path)
    if path == list(range(len(path))) and cache[0][0].shape[2] == length:
        return cache
    flat = [t for kv in cache for t in kv]
    # the first layer's pair stands for all (a cache's tensors come from one forward; the
    # kernel checks each one's device and dtype itself)
    if not chunked_scan_compiled.serves("auto", *flat[:2]):
        return keep_slots_reference(cache, start, path)
    dst, src = _moves(start, path)
    out = chunked_scan_compiled.EXTENSION.load().kv_keep(flat, dst, src, length)
    return tuple(zip(out[0::2], out[1::2]))
