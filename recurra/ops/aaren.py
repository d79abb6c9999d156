"""Attention as an RNN (Feng et al., arXiv 2405.13956): softmax attention of one query over every
prefix, as a recurrence of (m, u, w).

For scores ``s_t`` (one query against key t) and values ``v_t``:

    m_t = max_{i<=t} s_i,   u_t = sum_{i<=t} exp(s_i - m_t),   w_t = sum_{i<=t} exp(s_i - m_t) v_i
    o_t = w_t / u_t  = softmax(s_{1..t}) . v_{1..t}

Step: ``m' = max(m, s)``, ``u' = u exp(m - m') + exp(s - m')``, ``w' = w exp(m - m') + v exp(s - m')``.
Every exponent is <= 0, so scores of any magnitude are safe. The empty state is (-inf, 0, 0).

Shapes: ``s`` (B, H, T), ``v`` (B, H, T, Dv); state ``(m (B, H), u (B, H), w (B, H, Dv))``.
A score of -inf is a step that changes nothing (used for padding).

- ``aaren_reference``: the step above, in a loop (the oracle).
- ``aaren_combine``: the associative operator on (m, u, w) triples (any bracketing gives the
  same prefix result).
- ``aaren_chunked``: chunks of ``chunk_size`` steps; inside a chunk the masked (Q x Q) weights
  ``exp(s_i - m_t)``, across chunks the same over chunk summaries; O(T * chunk_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def _finite(m: torch.Tensor) -> torch.Tensor:
    """-inf (nothing seen yet) -> 0, so that exp(x - m) is never exp(-inf + inf)."""
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def _carry(m_old: torch.Tensor, m_new: torch.Tensor) -> torch.Tensor:
    """exp(m_old - m_new) (m_new >= m_old, a running maximum): the factor that re-expresses a
    state's (u, w) relative to the new maximum; 1 when both are -inf (nothing seen yet)."""
    zero = torch.zeros((), dtype=m_new.dtype, device=m_new.device)
    return torch.where(torch.isfinite(m_new), m_old - _finite(m_new), zero).exp()


def _later_max(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """max(old, new) with ties going to ``old`` (so -inf steps leave the state's m alone,
    gradients included)."""
    return torch.where(new > old, new, old)


def _divide(w: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """w / u, with 0 where nothing has been seen (u == 0)."""
    one = torch.ones((), dtype=u.dtype, device=u.device)
    return w / torch.where(u > 0, u, one).unsqueeze(-1)


def empty_state(batch: int, heads: int, value_dim: int, dtype=None, device=None):
    """The identity (-inf, 0, 0)."""
    m = torch.full((batch, heads), NEG_INF, dtype=dtype, device=device)
    return m, torch.zeros(batch, heads, dtype=dtype, device=device), torch.zeros(
        batch, heads, value_dim, dtype=dtype, device=device)


def _check(s, v, initial_state):
    if s.dim() != 3:
        raise ValueError(f"s must have shape (batch, heads, time), got {tuple(s.shape)}")
    if v.dim() != 4 or v.shape[:3] != s.shape:
        raise ValueError(f"v must have shape (batch, heads, time, value_dim) with "
                         f"{tuple(s.shape)} first, got {tuple(v.shape)}")
    b, h, _ = s.shape
    dv = v.shape[-1]
    if initial_state is None:
        return empty_state(b, h, dv, s.dtype, s.device)
    m, u, w = initial_state
    if m.shape != (b, h) or u.shape != (b, h) or w.shape != (b, h, dv):
        raise ValueError(f"initial_state must be (m, u, w) of shapes {(b, h)}, {(b, h)}, "
                         f"{(b, h, dv)}, got {tuple(m.shape)}, {tuple(u.shape)}, "
                         f"{tuple(w.shape)}")
    return m, u, w


def aaren_combine(left, right):
    """(m_A, u_A, w_A) + (m_B, u_B, w_B): the state of A's steps followed by B's."""
    m_a, u_a, w_a = left
    m_b, u_b, w_b = right
    m = _later_max(m_a, m_b)
    fa, fb = _carry(m_a, m), _carry(m_b, m)
    return m, u_a * fa + u_b * fb, w_a * fa.unsqueeze(-1) + w_b * fb.unsqueeze(-1)


def aaren_reference(s, v, initial_state=None):
    """The step, one at a time. Returns ``o`` (B, H, T, Dv) and the final (m, u, w)."""
    m, u, w = _check(s, v, initial_state)
    outs = []
    for t in range(s.shape[-1]):
        s_t, v_t = s[:, :, t], v[:, :, t]
        m_new = _later_max(m, s_t)
        keep, add = _carry(m, m_new), (s_t - _finite(m_new)).exp()
        u = u * keep + add
        w = w * keep.unsqueeze(-1) + v_t * add.unsqueeze(-1)
        m = m_new
        outs.append(_divide(w, u))
    o = torch.stack(outs, 2) if outs else v.new_zeros(v.shape)
    return o, (m, u, w)


def aaren_chunked(s, v, initial_state=None, chunk_size: int = 64):
    """Chunked parallel form, equal to ``aaren_reference``."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    m0, u0, w0 = _check(s, v, initial_state)
    b, h, t = s.shape
    dv = v.shape[-1]
    if t == 0:
        return v.new_zeros(v.shape), (m0, u0, w0)
    q = min(chunk_size, t)
    nc = -(-t // q)
    pad = nc * q - t
    if pad:
        s = F.pad(s, (0, pad), value=NEG_INF)
        v = F.pad(v, (0, 0, 0, pad))
    sc = s.view(b, h, nc, q)
    vc = v.view(b, h, nc, q, dv)
    # running maximum at every step, the initial state included
    m = _later_max(m0.unsqueeze(-1), s.cummax(-1).values).view(b, h, nc, q)
    ms = _finite(m)
    # 1. inside each chunk: weights exp(s_i - m_t) for i <= t (never above 1)
    causal = torch.ones(q, q, dtype=torch.bool, device=s.device).tril()
    neg = torch.full((), NEG_INF, dtype=s.dtype, device=s.device)
    p = torch.where(causal, sc.unsqueeze(-2) - ms.unsqueeze(-1), neg).exp()   # (b,h,nc,q,q)
    u_in = p.sum(-1)
    w_in = p @ vc
    # 2. chunk summaries, each relative to its own maximum
    cmax = sc.max(-1).values                                            # (b, h, nc)
    cw = (sc - _finite(cmax).unsqueeze(-1)).exp()
    u_c = cw.sum(-1)
    w_c = (cw.unsqueeze(-2) @ vc).squeeze(-2)                           # (b, h, nc, dv)
    # 3. carry into each chunk: initial state and earlier chunks, relative to the running max
    m_enter = torch.cat([m0.unsqueeze(-1), m[..., :-1, -1]], -1)        # (b, h, nc)
    me = _finite(m_enter)
    earlier = torch.ones(nc, nc, dtype=torch.bool, device=s.device).tril(-1)
    p2 = torch.where(earlier, cmax.unsqueeze(-2) - me.unsqueeze(-1), neg).exp()  # (b,h,nc,nc)
    f0 = _carry(m0.unsqueeze(-1), m_enter)
    u_enter = p2 @ u_c.unsqueeze(-1) + (f0 * u0.unsqueeze(-1)).unsqueeze(-1)     # (b,h,nc,1)
    w_enter = p2 @ w_c + f0.unsqueeze(-1) * w0.unsqueeze(-2)
    # 4. combine
    f = _carry(m_enter.unsqueeze(-1), m)                                # (b, h, nc, q)
    u_all = f * u_enter + u_in
    w_all = f.unsqueeze(-1) * w_enter.unsqueeze(-2) + w_in
    o = _divide(w_all, u_all).reshape(b, h, nc * q, dv)[:, :, :t]
    return o, (m[..., -1, -1], u_all[..., -1, -1], w_all[..., -1, -1, :])
