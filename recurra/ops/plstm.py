"""pLSTM (Pöppel et al., arXiv 2506.11997): linear Source-Transition-Mark recurrences on DAGs.

Cell states live on the edges of the DAG. For an edge e leaving node u,

    C_e = sum_{e' into u} T_{u, e'->e} C_{e'}  +  S_{u, e} k_u v_u^T
    h_w = sum_{e into w} M_{w, e} q_w^T C_e  +  D_w (q_w . k_w) v_w

(one matrix state (d_k, d_v) per edge and head; gates are scalars per node and head).

1D (a chain): ``C_t = T_t C_{t-1} + S_t k_t v_t^T`` and ``h_t = M_t q_t^T C_{t-1} + D_t (q_t.k_t) v_t``
(the output reads the *incoming* state; the local term is separate).
- :func:`plstm_1d_reference`: the loop over t;
- :func:`plstm_1d_chunked`: chunkwise-parallel form: inside a chunk, an attention-like masked
  product with the transition products as decays (log space with signs, so negative T of D-mode
  are fine), states only at chunk borders.

2D grid (B, X, Y, ...): node (x, y) has incoming edges from the left (x-1, y) and from above
(x, y-1) and outgoing edges right (r) and down (d):

    C^r = T^rl C^r_{x-1,y} + T^ru C^d_{x,y-1} + S^r k v^T
    C^d = T^dl C^r_{x-1,y} + T^du C^d_{x,y-1} + S^d k v^T
    h   = q^T (M^l C^r_{x-1,y} + M^u C^d_{x,y-1}) + D (q.k) v

with zero states entering at the borders.
- :func:`plstm_2d_reference`: node-by-node loop in raster order (a topological order of the DAG);
- :func:`plstm_2d_wavefront`: all nodes of an anti-diagonal x + y = n at once (they are
  independent), X + Y - 1 vectorised steps. (The paper's log-depth hierarchical form is not
  implemented here.)
Shapes (2D): q, k (B, X, Y, H, dk), v (B, X, Y, H, dv), gates (B, X, Y, H).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


# =============================================================================== 1D
def _check_1d(q, k, v, gates, state):
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"q, k must have shape (batch, time, heads, d_key) and v (batch, time, "
                         f"heads, d_value); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for name, g in gates.items():
        if g.shape != q.shape[:3]:
            raise ValueError(f"{name} must have shape {tuple(q.shape[:3])} (batch, time, heads), "
                             f"got {tuple(g.shape)}")
    b, _, h, dk = q.shape
    want = (b, h, dk, v.shape[-1])
    if state is not None and state.shape != want:
        raise ValueError(f"state must have shape {want}, got {tuple(state.shape)}")


def plstm_1d_reference(q, k, v, source, transition, mark, direct, state=None):
    """Loop over t. Returns ``(h (B, T, H, dv), C_T (B, H, dk, dv))``."""
    _check_1d(q, k, v, dict(source=source, transition=transition, mark=mark, direct=direct),
              state)
    b, t, h, dk = q.shape
    C = q.new_zeros(b, h, dk, v.shape[-1]) if state is None else state
    hs = []
    for i in range(t):
        qi, ki, vi = q[:, i], k[:, i], v[:, i]
        read = torch.einsum("bhk,bhkv->bhv", qi, C)
        local = (qi * ki).sum(-1, keepdim=True) * vi
        hs.append(mark[:, i, :, None] * read + direct[:, i, :, None] * local)
        C = (transition[:, i, :, None, None] * C
             + source[:, i, :, None, None] * ki.unsqueeze(-1) * vi.unsqueeze(-2))
    out = torch.stack(hs, 1) if hs else v.new_zeros(v.shape)
    return out, C


def _segment_products(log_abs, sign, strict: bool):
    """P[t, s] = prod_{j=s+1..t} T_j (s <= t, or s < t when ``strict``), 0 elsewhere.

    ``log_abs``/``sign`` (N, L): log|T| and sign(T) (sign 1 where T = 0; its log is -inf).
    """
    n, L = log_abs.shape
    below = torch.ones(L, L, dtype=torch.bool, device=log_abs.device).tril(-1)
    rep = torch.where(below, log_abs.unsqueeze(2).expand(n, L, L),
                      torch.zeros((), dtype=log_abs.dtype, device=log_abs.device))
    seg = torch.cumsum(rep, 1)  # [t, s] = sum_{j=s+1..t}
    keep = below if strict else below | torch.eye(L, dtype=torch.bool, device=log_abs.device)
    csign = torch.cumprod(sign, 1)
    sgn = csign.unsqueeze(2) * csign.unsqueeze(1)  # prod of signs over (s, t] (signs are +-1)
    return torch.where(keep, torch.exp(seg) * sgn,
                       torch.zeros((), dtype=log_abs.dtype, device=log_abs.device))


def plstm_1d_chunked(q, k, v, source, transition, mark, direct, state=None, chunk=64):
    """Chunkwise-parallel form; same result as :func:`plstm_1d_reference`."""
    _check_1d(q, k, v, dict(source=source, transition=transition, mark=mark, direct=direct),
              state)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    C = q.new_zeros(b, h, dk, dv) if state is None else state
    # heads next to batch: (N = B*H, T, ...)
    def nh(x):
        return x.transpose(1, 2).reshape(b * h, t, *x.shape[3:])

    qn, kn, vn = nh(q), nh(k), nh(v)
    S, T, M, Dg = nh(source), nh(transition), nh(mark), nh(direct)
    C = C.reshape(b * h, dk, dv)
    local = Dg.unsqueeze(-1) * (qn * kn).sum(-1, keepdim=True) * vn
    outs = []
    for start in range(0, t, chunk):
        sl = slice(start, min(start + chunk, t))
        qc, kc, vc, Sc, Tc, Mc = qn[:, sl], kn[:, sl], vn[:, sl], S[:, sl], T[:, sl], M[:, sl]
        L = qc.shape[1]
        log_abs = torch.log(Tc.abs())
        sign = torch.where(Tc < 0, -torch.ones_like(Tc), torch.ones_like(Tc))
        # query t reads C_{t-1} = prod_{j<t} T_j C_0 + sum_{s<t} prod_{j=s+1..t-1} T_j S_s k_s v_s^T
        seg = _segment_products(log_abs, sign, strict=False)  # [a, s] = prod_{j=s+1..a}, s <= a
        P_read = torch.cat([seg.new_zeros(seg.shape[0], 1, L), seg[:, :-1]], 1)  # [t, s] = seg[t-1, s]
        lead_abs = torch.cat([log_abs.new_zeros(log_abs.shape[0], 1), log_abs[:, :-1]], 1)
        lead_sign = torch.cat([sign.new_ones(sign.shape[0], 1), sign[:, :-1]], 1)
        decay_in = torch.exp(torch.cumsum(lead_abs, 1)) * torch.cumprod(lead_sign, 1)  # prod_{j<t}
        scores = (qc @ kc.transpose(1, 2)) * P_read * Sc.unsqueeze(1)  # (N, t, s)
        read = scores @ vc + decay_in.unsqueeze(-1) * (qc @ C)
        outs.append(Mc.unsqueeze(-1) * read)
        # state after the chunk: C_L = prod_{all} T C_0 + sum_s prod_{j=s+1..L} T_j S_s k_s v_s^T
        tail_sign = torch.flip(torch.cumprod(torch.flip(sign, [1]), 1), [1]) * sign
        w = torch.exp(_suffix_log(log_abs)) * tail_sign * Sc
        total = torch.exp(log_abs.sum(1)) * torch.prod(sign, 1)
        C = total[:, None, None] * C + kc.transpose(1, 2) @ (w.unsqueeze(-1) * vc)
    out = torch.cat(outs, 1) + local if outs else v.new_zeros(b * h, 0, dv)
    out = out.reshape(b, h, t, dv).transpose(1, 2)
    return out, C.reshape(b, h, dk, dv)


def _suffix_log(log_abs):
    """sum_{j=s+1..L} log|T_j| for every s, as a masked sum (no differences: -inf is fine)."""
    L = log_abs.shape[1]
    after = torch.ones(L, L, dtype=torch.bool, device=log_abs.device).triu(1)  # [s, j]: j > s
    rep = torch.where(after, log_abs.unsqueeze(1).expand(-1, L, L),
                      torch.zeros((), dtype=log_abs.dtype, device=log_abs.device))
    return rep.sum(-1)


# =============================================================================== 2D
def _check_2d(q, k, v, gates):
    if q.dim() != 5 or k.shape != q.shape or v.shape[:4] != q.shape[:4]:
        raise ValueError(f"q, k must have shape (batch, X, Y, heads, d_key) and v (batch, X, Y, "
                         f"heads, d_value); got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    for name, g in gates.items():
        if g.shape != q.shape[:4]:
            raise ValueError(f"{name} must have shape {tuple(q.shape[:4])} (batch, X, Y, heads),"
                             f" got {tuple(g.shape)}")


def plstm_2d_reference(q, k, v, s_r, s_d, t_rl, t_ru, t_dl, t_du, m_l, m_u, direct):
    """Node-by-node loop in raster order. Returns ``(h (B, X, Y, H, dv), (C^r, C^d))`` where
    C^r (B, X, Y, H, dk, dv) holds every node's right-going state and C^d its down-going one."""
    _check_2d(q, k, v, dict(s_r=s_r, s_d=s_d, t_rl=t_rl, t_ru=t_ru, t_dl=t_dl, t_du=t_du,
                            m_l=m_l, m_u=m_u, direct=direct))
    b, X, Y, h, dk = q.shape
    dv = v.shape[-1]
    zero = q.new_zeros(b, h, dk, dv)
    Cr, Cd, out = {}, {}, {}

    def g(t, x, y):
        return t[:, x, y, :, None, None]

    for x in range(X):
        for y in range(Y):
            left = Cr[x - 1, y] if x > 0 else zero
            up = Cd[x, y - 1] if y > 0 else zero
            qi, ki, vi = q[:, x, y], k[:, x, y], v[:, x, y]
            kv = ki.unsqueeze(-1) * vi.unsqueeze(-2)
            Cr[x, y] = g(t_rl, x, y) * left + g(t_ru, x, y) * up + g(s_r, x, y) * kv
            Cd[x, y] = g(t_dl, x, y) * left + g(t_du, x, y) * up + g(s_d, x, y) * kv
            read = g(m_l, x, y) * left + g(m_u, x, y) * up
            out[x, y] = (torch.einsum("bhk,bhkv->bhv", qi, read)
                         + direct[:, x, y, :, None] * (qi * ki).sum(-1, keepdim=True) * vi)
    hs = torch.stack([torch.stack([out[x, y] for y in range(Y)], 1) for x in range(X)], 1)
    cr = torch.stack([torch.stack([Cr[x, y] for y in range(Y)], 1) for x in range(X)], 1)
    cd = torch.stack([torch.stack([Cd[x, y] for y in range(Y)], 1) for x in range(X)], 1)
    return hs, (cr, cd)


def plstm_2d_wavefront(q, k, v, s_r, s_d, t_rl, t_ru, t_dl, t_du, m_l, m_u, direct,
                       return_states: bool = False):
    """Anti-diagonal wavefront; same result as :func:`plstm_2d_reference`.

    Returns ``h`` (B, X, Y, H, dv), and with ``return_states`` also the largest |C| entry over
    the grid of each batch row and head (B, H) (the full grids of states are not kept).
    """
    _check_2d(q, k, v, dict(s_r=s_r, s_d=s_d, t_rl=t_rl, t_ru=t_ru, t_dl=t_dl, t_du=t_du,
                            m_l=m_l, m_u=m_u, direct=direct))
    b, X, Y, h, dk = q.shape
    dv = v.shape[-1]
    dev = q.device
    # previous diagonal's states, indexed by x (X + 1 slots: slot 0 is the left border)
    prev_r = q.new_zeros(b, X + 1, h, dk, dv)
    prev_d = q.new_zeros(b, X + 1, h, dk, dv)
    outs, order = [], []
    biggest = q.new_zeros(b, h)
    for n in range(X + Y - 1):
        xs = torch.arange(max(0, n - Y + 1), min(n, X - 1) + 1, device=dev)
        ys = n - xs
        left = prev_r[:, xs]  # state of (x-1, y) sits in slot x (slot = x_of_node + 1)
        up = torch.where((ys > 0).view(1, -1, 1, 1, 1), prev_d[:, xs + 1],
                         torch.zeros((), dtype=q.dtype, device=dev))

        def at(t):
            return t[:, xs, ys]  # (B, n_diag, H, ...)

        qi, ki, vi = at(q), at(k), at(v)
        kv = ki.unsqueeze(-1) * vi.unsqueeze(-2)

        def g(t):
            return at(t)[..., None, None]

        cr = g(t_rl) * left + g(t_ru) * up + g(s_r) * kv
        cd = g(t_dl) * left + g(t_du) * up + g(s_d) * kv
        read = g(m_l) * left + g(m_u) * up
        outs.append(torch.einsum("bnhk,bnhkv->bnhv", qi, read)
                    + at(direct)[..., None] * (qi * ki).sum(-1, keepdim=True) * vi)
        order.append(xs * Y + ys)
        # the right-going state of (x, y) is read by (x+1, y) from slot x+1; the down-going one by
        # (x, y+1) from slot x+1 as well
        prev_r = q.new_zeros(b, X + 1, h, dk, dv).index_copy(1, xs + 1, cr)
        prev_d = q.new_zeros(b, X + 1, h, dk, dv).index_copy(1, xs + 1, cd)
        if return_states:
            biggest = torch.maximum(biggest, torch.maximum(
                cr.detach().abs().amax((1, 3, 4)), cd.detach().abs().amax((1, 3, 4))))
    flat = torch.cat(outs, 1)  # nodes in wavefront order
    perm = torch.cat(order)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=dev)
    hs = flat.index_select(1, inv).view(b, X, Y, h, dv)
    return (hs, biggest) if return_states else hs
