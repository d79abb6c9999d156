"""Causal sliding-window softmax attention with persistent (always visible) memory tokens.

Query t attends to the keys of tokens t - window + 1 .. t and to ``P`` persistent key/value pairs
(Titans' persistent memory; learned, input independent). Before the sequence, the keys come from a
cache of the last ``window - 1`` tokens with a 0/1 ``valid`` flag each (an empty cache is all 0),
which makes the step form constant in memory.

Shapes: q, k, v (B, T, H, d); persistent_k/v (P, H, d); cache_k/v (B, window - 1, H, d); cache_valid
(B, window - 1). Scores are scaled by 1/sqrt(d).

- :func:`sliding_window_attention_reference`: a loop over queries (the oracle);
- :func:`sliding_window_attention`: blocked form: queries in blocks of ``window``, each against its
  own block and the previous one (O(T * window) memory).
Both return ``(y (B, T, H, d), (new_cache_k, new_cache_v, new_cache_valid))``; with ``lengths`` the
new cache of row b ends at its length.
"""

from __future__ import annotations

import math

import torch


def _prepare(q, k, v, window, cache_k, cache_v, cache_valid, persistent_k, persistent_v):
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must have shape (batch, time, heads, dim) and v (batch, time, heads,"
                         f" dim_v); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, h, d = q.shape
    dv = v.shape[-1]
    if cache_k is None:
        cache_k = q.new_zeros(b, window - 1, h, d)
        cache_v = q.new_zeros(b, window - 1, h, dv)
        cache_valid = q.new_zeros(b, window - 1)
    if (cache_k.shape != (b, window - 1, h, d) or cache_v.shape != (b, window - 1, h, dv)
            or cache_valid.shape != (b, window - 1)):
        raise ValueError(f"cache_k/cache_v/cache_valid must have shapes {(b, window - 1, h, d)}, "
                         f"{(b, window - 1, h, dv)}, {(b, window - 1)}; got {tuple(cache_k.shape)}, "
                         f"{tuple(cache_v.shape)}, {tuple(cache_valid.shape)}")
    if persistent_k is None:
        persistent_k, persistent_v = q.new_zeros(0, h, d), q.new_zeros(0, h, dv)
    if persistent_k.shape[1:] != (h, d) or persistent_v.shape != (persistent_k.shape[0], h, dv):
        raise ValueError(f"persistent_k/v must have shapes (P, {h}, {d}) and (P, {h}, {dv}), got "
                         f"{tuple(persistent_k.shape)}, {tuple(persistent_v.shape)}")
    return cache_k, cache_v, cache_valid, persistent_k, persistent_v


def _new_cache(cache_k, cache_v, cache_valid, k, v, lengths, window):
    keep = window - 1
    if keep == 0:
        return cache_k, cache_v, cache_valid
    ks = torch.cat([cache_k, k], 1)
    vs = torch.cat([cache_v, v], 1)
    ok = torch.cat([cache_valid, cache_valid.new_ones(k.shape[:2])], 1)
    t = k.shape[1]
    end = (torch.full((k.shape[0],), t, device=k.device, dtype=torch.long)
           if lengths is None else lengths)
    idx = end.unsqueeze(1) + torch.arange(keep, device=k.device).unsqueeze(0)  # (B, keep)

    def take(x):
        ix = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
        return x.gather(1, ix)

    return take(ks), take(vs), take(ok)


def sliding_window_attention_reference(q, k, v, window, cache_k=None, cache_v=None,
                                       cache_valid=None, persistent_k=None, persistent_v=None,
                                       lengths=None):
    """Loop over queries: softmax over persistent keys and the valid keys of the window."""
    cache_k, cache_v, cache_valid, pk, pv = _prepare(q, k, v, window, cache_k, cache_v,
                                                     cache_valid, persistent_k, persistent_v)
    b, t, h, d = q.shape
    keep = window - 1
    ks = torch.cat([cache_k, k], 1)
    vs = torch.cat([cache_v, v], 1)
    ok = torch.cat([cache_valid, cache_valid.new_ones(b, t)], 1) > 0.5
    ys = []
    for i in range(t):
        lo, hi = i, i + keep + 1  # window keys of query i in the concatenation
        kk = torch.cat([pk.unsqueeze(0).expand(b, -1, -1, -1), ks[:, lo:hi]], 1)
        vv = torch.cat([pv.unsqueeze(0).expand(b, -1, -1, -1), vs[:, lo:hi]], 1)
        mask = torch.cat([ok.new_ones(b, pk.shape[0]), ok[:, lo:hi]], 1)  # (B, keys)
        s = torch.einsum("bhd,bkhd->bhk", q[:, i], kk) / math.sqrt(d)
        s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
        ys.append(torch.einsum("bhk,bkhd->bhd", torch.softmax(s, -1), vv))
    y = torch.stack(ys, 1) if ys else q.new_zeros(b, 0, h, v.shape[-1])
    if lengths is not None:
        live = torch.arange(t, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)
        y = torch.where(live[:, :, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y, _new_cache(cache_k, cache_v, cache_valid, k, v, lengths, window)


def sliding_window_attention(q, k, v, window, cache_k=None, cache_v=None, cache_valid=None,
                             persistent_k=None, persistent_v=None, lengths=None):
    """Blocked form; same result as the reference."""
    cache_k, cache_v, cache_valid, pk, pv = _prepare(q, k, v, window, cache_k, cache_v,
                                                     cache_valid, persistent_k, persistent_v)
    b, t, h, d = q.shape
    dv = v.shape[-1]
    w = window
    nb = -(-t // w)
    pad = nb * w - t
    # key positions -w .. nb*w - 1: one unused slot, the cache (w - 1), the tokens, the padding
    ks = torch.cat([k.new_zeros(b, 1, h, d), cache_k, k, k.new_zeros(b, pad, h, d)], 1)
    vs = torch.cat([v.new_zeros(b, 1, h, dv), cache_v, v, v.new_zeros(b, pad, h, dv)], 1)
    ok = torch.cat([cache_valid.new_zeros(b, 1), cache_valid, cache_valid.new_ones(b, t + pad)],
                   1) > 0.5
    kb = ks.view(b, nb + 1, w, h, d)
    vb = vs.view(b, nb + 1, w, h, dv)
    okb = ok.view(b, nb + 1, w)
    keys = torch.cat([kb[:, :-1], kb[:, 1:]], 2)  # (B, nb, 2w, H, d): previous and own block
    vals = torch.cat([vb[:, :-1], vb[:, 1:]], 2)
    okk = torch.cat([okb[:, :-1], okb[:, 1:]], 2)  # (B, nb, 2w)
    qb = torch.cat([q, q.new_zeros(b, pad, h, d)], 1).view(b, nb, w, h, d)
    r = torch.arange(w, device=q.device).unsqueeze(1)
    j = torch.arange(2 * w, device=q.device).unsqueeze(0)
    band = (j > r) & (j <= r + w)  # (w, 2w): keys t-w+1 .. t of query r
    mask = band.view(1, 1, 1, w, 2 * w) & okk.unsqueeze(2).unsqueeze(3)  # (B, nb, 1, w, 2w)
    scale = 1.0 / math.sqrt(d)
    s = torch.einsum("bnrhd,bnjhd->bnhrj", qb, keys) * scale
    s = s.masked_fill(~mask, float("-inf"))
    sp = torch.einsum("bnrhd,phd->bnhrp", qb, pk) * scale
    probs = torch.softmax(torch.cat([sp, s], -1), -1)
    pp, pw = probs[..., :pk.shape[0]], probs[..., pk.shape[0]:]
    y = torch.einsum("bnhrj,bnjhd->bnrhd", pw, vals) + torch.einsum("bnhrp,phd->bnrhd", pp, pv)
    y = y.reshape(b, nb * w, h, dv)[:, :t]
    if lengths is not None:
        live = torch.arange(t, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)
        y = torch.where(live[:, :, None, None], y, torch.zeros((), dtype=y.dtype, device=y.device))
    return y, _new_cache(cache_k, cache_v, cache_valid, k, v, lengths, window)
