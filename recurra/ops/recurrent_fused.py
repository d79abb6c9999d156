"""Fast CPU paths of the classic cells: a time loop with a hand-written backward.

Same math and layout as ``recurrent_cells.recurrence_reference`` (read that first). Autograd
through a Python time loop records a dozen nodes per step and replays them one by one; here the
forward stores the activated gates, the backward runs one short loop over time (a handful of
tensor ops per step: the pointwise derivatives that do not depend on the incoming gradient are
precomputed for all steps at once), and the recurrent-weight gradient is one batched matmul over
all steps after the loop. Every step writes into preallocated buffers (``out=``).

``recurrence(cell, wx, r, state0, ...)`` dispatches on ``backend``:
- ``"compiled"``: the same two loops in C++ (``recurrent_compiled``);
- ``"fused"``: the autograd Functions below;
- ``"reference"``: the plain loop with autograd.
Both return the same numbers (tests hold them to each other, and to torch.nn).
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from .recurrent_cells import CELLS, recurrence_reference

BACKENDS = ("compiled", "fused", "reference")


def recurrence(
    cell: str,
    wx: torch.Tensor,
    r: torch.Tensor,
    state0: tuple[torch.Tensor, ...],
    bias_hn: torch.Tensor | None = None,
    nonlinearity: str = "tanh",
    backend: str = "fused",
    panels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """All states of a block-diagonal recurrent cell over time.

    Args:
        cell: "lstm", "gru", "elman" or "slstm".
        wx: (T, N, B, G*dh) input pre-activations (biases folded in, except GRU's b_hn).
        r: (N, dh, G*dh) recurrent weights, head by head.
        state0: tuple of (N, B, dh) tensors.
        bias_hn: GRU only, (N, 1, dh): the recurrent bias inside the reset gate.
        nonlinearity: Elman only, "tanh" or "relu".
        backend: "compiled" (C++ loops, hand-written backward), "fused" (Python loop,
            hand-written backward) or "reference" (loop + autograd).
        panels: "compiled" only, for inference: ``r`` packed for the row-exact product
            (``recurrent_compiled.pack_recurrent``; see ``recurra.ops.row_exact``).
    Returns:
        tuple of (T, N, B, dh) tensors, one per state component (h first).
    """
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    gates, n_states = CELLS[cell]
    if wx.dim() != 4 or r.dim() != 3 or wx.shape[-1] != gates * r.shape[1]:
        raise ValueError(
            f"wx must be (T, N, B, {gates}*dh) and r (N, dh, {gates}*dh), "
            f"got {tuple(wx.shape)} and {tuple(r.shape)}"
        )
    if len(state0) != n_states:
        raise ValueError(f"state0 must hold {n_states} tensors for {cell}, got {len(state0)}")
    if wx.shape[0] == 0:
        return tuple(s.new_zeros((0, *s.shape)) for s in state0)
    if cell == "elman" and nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    if panels is not None and backend != "compiled":
        raise ValueError(f"panels (the row-exact product) need backend='compiled', got "
                         f"{backend!r}")
    if backend == "reference":
        return recurrence_reference(cell, wx, r, state0, bias_hn, nonlinearity)
    if backend == "compiled":
        from . import recurrent_compiled

        return recurrent_compiled.recurrence(cell, wx, r, state0, bias_hn, nonlinearity, panels)
    if cell == "lstm":
        return _LSTM.apply(wx, r, *state0)
    if cell == "gru":
        if bias_hn is None:
            bias_hn = wx.new_zeros(r.shape[0], 1, r.shape[1])
        return (_GRU.apply(wx, r, bias_hn, state0[0]),)
    if cell == "elman":
        return (_Elman.apply(wx, r, state0[0], nonlinearity == "relu"),)
    return _SLSTM.apply(wx, r, *state0)


def _shifted(first: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """(T, ...) sequence of previous values: first, seq[0], ..., seq[T-2]."""
    return torch.cat([first.unsqueeze(0), seq[:-1]], 0)


def _steps(like: torch.Tensor, *inner: int, dtype=None) -> torch.Tensor:
    """An empty (T, N, B, *inner) buffer stored time-, batch-, then head-major.

    The layers hand the ops ``wx`` as a (T, N, B, .) view of a (T, B, N, .) tensor (the input
    projection computed time-major), so buffers in that order make every per-step slice and the
    gradient returned for ``wx`` free of copies.
    """
    T, N, B = like.shape[:3]
    return torch.empty((T, B, N, *inner), dtype=dtype or like.dtype,
                       device=like.device).transpose(1, 2)


def _affine(inp: torch.Tensor, h: torch.Tensor, r: torch.Tensor,
            out: torch.Tensor | None = None) -> torch.Tensor:
    """inp + h @ r head by head ((N, B, .) tensors); a plain addmm when there is one head, which
    is markedly faster than baddbmm with a broadcast input."""
    if r.shape[0] == 1:
        if out is None:
            return torch.addmm(inp[0], h[0], r[0]).unsqueeze(0)
        torch.addmm(inp[0], h[0], r[0], out=out[0])
        return out
    return torch.baddbmm(inp, h, r, out=out)


def _matmul(h: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """h @ r head by head."""
    return torch.mm(h[0], r[0]).unsqueeze(0) if r.shape[0] == 1 else torch.bmm(h, r)


def weight_grad(h0: torch.Tensor, hs: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """sum_t h_{t-1}^T d_t per head, h_{-1} = h0: (N, dh, K) from two batched matmuls."""
    T, N, B, dh = hs.shape
    out = torch.bmm(h0.transpose(1, 2), d[0])
    if T > 1:
        a = hs[:-1].transpose(0, 1).reshape(N, (T - 1) * B, dh)
        b = d[1:].transpose(0, 1).reshape(N, (T - 1) * B, d.shape[-1])
        out = out.baddbmm_(a.transpose(1, 2), b)
    return out


class _LSTM(Function):
    @staticmethod
    def forward(ctx, wx, r, h0, c0):
        T, N, B, G = wx.shape
        dh = G // 4
        acts = _steps(wx, G)
        hs = _steps(wx, dh)
        cs = _steps(wx, dh)
        tmp = wx.new_empty(N, B, dh)
        pre = wx.new_empty(N, B, G)
        pre_g = pre[..., 2 * dh:3 * dh]
        gate = acts.view(T, N, B, 4, dh).unbind(3)
        i_s, f_s, g_s, o_s = (x.unbind(0) for x in gate)
        h, c = h0, c0
        for t, (wx_t, a_t, h_t, c_t) in enumerate(zip(wx.unbind(0), acts.unbind(0),
                                                       hs.unbind(0), cs.unbind(0))):
            _affine(wx_t, h, r, out=pre)
            torch.sigmoid(pre, out=a_t)
            torch.tanh(pre_g, out=g_s[t])
            torch.mul(f_s[t], c, out=c_t)
            c_t.addcmul_(i_s[t], g_s[t])
            torch.tanh(c_t, out=tmp)
            torch.mul(o_s[t], tmp, out=h_t)
            h, c = h_t, c_t
        ctx.save_for_backward(r, h0, c0, acts, hs, cs)
        return hs, cs

    @staticmethod
    def backward(ctx, dhs, dcs):
        r, h0, c0, acts, hs, cs = ctx.saved_tensors
        T, N, B, G = acts.shape
        dh_ = G // 4
        a = acts.view(T, N, B, 4, dh_)
        i, f, g, o = a.unbind(3)
        tc = torch.tanh(cs)
        c_prev = _shifted(c0, cs)
        # d c_t += d h_t * A_t ; d pre = K * (dc, dc, dc, dh)
        A = o * (1 - tc * tc)
        K = torch.stack([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g),
                         tc * o * (1 - o)], 3)
        D = _steps(a, 4, dh_)
        K3, Ko = K[..., :3, :].unbind(0), K[..., 3, :].unbind(0)
        D3, Do = D[..., :3, :].unbind(0), D[..., 3, :].unbind(0)
        Dflat = D.view(T, N, B, G).unbind(0)
        rT = r.transpose(1, 2)
        dhn = torch.zeros_like(h0)
        dcn = torch.zeros_like(c0)
        f_s, A_s, dhs_s, dcs_s = f.unbind(0), A.unbind(0), dhs.unbind(0), dcs.unbind(0)
        for t in range(T - 1, -1, -1):
            dh_t = dhs_s[t] + dhn
            dc_t = torch.addcmul(dcs_s[t] + dcn, dh_t, A_s[t])
            torch.mul(K3[t], dc_t.unsqueeze(-2), out=D3[t])
            torch.mul(Ko[t], dh_t, out=Do[t])
            dcn = dc_t * f_s[t]
            dhn = _matmul(Dflat[t], rT)
        Dg = D.view(T, N, B, G)
        return Dg, weight_grad(h0, hs, Dg), dhn, dcn


class _GRU(Function):
    @staticmethod
    def forward(ctx, wx, r, bias_hn, h0):
        T, N, B, G = wx.shape
        dh = G // 3
        rz = _steps(wx, 2 * dh)
        ns = _steps(wx, dh)
        hr = _steps(wx, G)  # R h + (0, 0, b_hn), kept for the backward
        hs = _steps(wx, dh)
        diff = wx.new_empty(N, B, dh)
        # the matmul's additive input: (wx_r, wx_z, b_hn), so that hr_t = (pre-activations of
        # r and z, R_n h + b_hn) comes out of one addmm
        inp = torch.empty_like(hr)
        inp[..., :2 * dh] = wx[..., :2 * dh]
        inp[..., 2 * dh:] = bias_hn
        h = h0
        for wx_t, inp_t, rz_t, n_t, hr_t, h_t in zip(wx.unbind(0), inp.unbind(0), rz.unbind(0),
                                                      ns.unbind(0), hr.unbind(0), hs.unbind(0)):
            _affine(inp_t, h, r, out=hr_t)
            torch.sigmoid(hr_t[..., :2 * dh], out=rz_t)
            torch.addcmul(wx_t[..., 2 * dh:], rz_t[..., :dh], hr_t[..., 2 * dh:], out=n_t)
            torch.tanh(n_t, out=n_t)
            torch.sub(h, n_t, out=diff)
            torch.addcmul(n_t, rz_t[..., dh:], diff, out=h_t)
            h = h_t
        ctx.save_for_backward(r, h0, rz, ns, hr, hs)
        return hs

    @staticmethod
    def backward(ctx, dhs):
        r, h0, rz, ns, hr, hs = ctx.saved_tensors
        T, N, B, dh = hs.shape
        hrn = hr[..., 2 * dh:]
        rr, z = rz[..., :dh], rz[..., dh:]
        h_prev = _shifted(h0, hs)
        kn = (1 - z) * (1 - ns * ns)
        # D = K * dh with K = [K_r, K_z, K_hn, K_n]: the first three are d(R h) (r, z, n parts),
        # and (K_r, K_z, K_n) are d(wx).
        K = torch.stack([kn * hrn * rr * (1 - rr), (h_prev - ns) * z * (1 - z), kn * rr, kn], 3)
        D = _steps(K, 4, dh)
        K_s, D_s, z_s, dhs_s = K.unbind(0), D.unbind(0), z.unbind(0), dhs.unbind(0)
        rT = r.transpose(1, 2)
        dhn = torch.zeros_like(h0)
        for t in range(T - 1, -1, -1):
            dh_t = dhs_s[t] + dhn
            torch.mul(K_s[t], dh_t.unsqueeze(-2), out=D_s[t])
            dhn = _affine(dh_t * z_s[t], D_s[t][..., :3, :].reshape(N, B, 3 * dh), rT)
        dhr = D[..., :3, :].reshape(T, N, B, 3 * dh)
        dwx = _steps(D, 3, dh)
        dwx[..., :2, :] = D[..., :2, :]
        dwx[..., 2, :] = D[..., 3, :]
        dwx = dwx.view(T, N, B, 3 * dh)
        dr = weight_grad(h0, hs, dhr)
        dbias = D[..., 2, :].sum((0, 2)).unsqueeze(1)
        return dwx, dr, dbias, dhn


class _Elman(Function):
    @staticmethod
    def forward(ctx, wx, r, h0, relu):
        T, N, B, dh = wx.shape
        hs = _steps(wx, dh)
        act = torch.relu_ if relu else torch.tanh_
        h = h0
        for wx_t, h_t in zip(wx.unbind(0), hs.unbind(0)):
            _affine(wx_t, h, r, out=h_t)
            act(h_t)
            h = h_t
        ctx.relu = relu
        ctx.save_for_backward(r, h0, hs)
        return hs

    @staticmethod
    def backward(ctx, dhs):
        r, h0, hs = ctx.saved_tensors
        K = (hs > 0).to(hs.dtype) if ctx.relu else 1 - hs * hs
        D = _steps(hs, hs.shape[-1])
        rT = r.transpose(1, 2)
        dhn = torch.zeros_like(h0)
        K_s, D_s, dhs_s = K.unbind(0), D.unbind(0), dhs.unbind(0)
        for t in range(hs.shape[0] - 1, -1, -1):
            torch.mul(dhs_s[t] + dhn, K_s[t], out=D_s[t])
            dhn = _matmul(D_s[t], rT)
        return D, weight_grad(h0, hs, D), dhn, None


class _SLSTM(Function):
    @staticmethod
    def forward(ctx, wx, r, h0, c0, n0, m0):
        T, N, B, G = wx.shape
        dh = G // 4
        # saved per step: i, f, z, o (activated), sigmoid(-f~), [i~ > log sigmoid(f~) + m]
        acts = _steps(wx, 4, dh)
        sf = _steps(wx, dh)
        sel = _steps(wx, dh, dtype=torch.bool)
        hs, cs, ns, ms = (_steps(wx, dh) for _ in range(4))
        g = wx.new_empty(N, B, G)
        lfm = wx.new_empty(N, B, dh)
        tmp = wx.new_empty(N, B, dh)
        h, c, n, m = h0, c0, n0, m0
        steps = zip(wx.unbind(0), acts.unbind(0), sf.unbind(0), sel.unbind(0), hs.unbind(0),
                    cs.unbind(0), ns.unbind(0), ms.unbind(0))
        for wx_t, a_t, sf_t, sel_t, h_t, c_t, n_t, m_t in steps:
            _affine(wx_t, h, r, out=g)
            gi, gf, gz, go = g.view(N, B, 4, dh).unbind(2)
            i_t, f_t, z_t, o_t = a_t.unbind(2)
            torch.sigmoid(-gf, out=sf_t)
            # log sigmoid(f~) + m, as recurrent_cells.log_sigmoid computes it
            torch.abs(gf, out=tmp).neg_().exp_().log1p_()
            torch.clamp(gf, max=0, out=lfm).sub_(tmp).add_(m)
            torch.gt(gi, lfm, out=sel_t)
            torch.maximum(gi, lfm, out=m_t)
            torch.sub(gi, m_t, out=i_t).exp_()
            torch.sub(lfm, m_t, out=f_t).exp_()
            torch.tanh(gz, out=z_t)
            torch.sigmoid(go, out=o_t)
            torch.mul(f_t, c, out=c_t).addcmul_(i_t, z_t)
            torch.addcmul(i_t, f_t, n, out=n_t)
            torch.div(c_t, n_t, out=tmp)
            torch.mul(o_t, tmp, out=h_t)
            h, c, n, m = h_t, c_t, n_t, m_t
        ctx.save_for_backward(r, h0, c0, n0, acts, sf, sel, hs, cs, ns)
        return hs, cs, ns, ms

    @staticmethod
    def backward(ctx, dhs, dcs, dns, dms):
        r, h0, c0, n0, acts, sf, sel, hs, cs, ns = ctx.saved_tensors
        T, N, B, _, dh = acts.shape
        i, f, z, o = acts.unbind(3)
        a1 = o / ns                      # d c_t += d h_t * o / n
        a2 = -hs / ns                    # d n_t += d h_t * (-h / n)
        a3 = cs / ns * o * (1 - o)       # d o~ = d h_t * c / n * o (1 - o)
        a4 = i * (1 - z * z)             # d z~ = d c_t * i (1 - z^2)
        c_prev, n_prev = _shifted(c0, cs), _shifted(n0, ns)
        D = _steps(acts, 4, dh)          # d (i~, f~, z~, o~)
        rT = r.transpose(1, 2)
        dhn = torch.zeros_like(h0)
        dcn = torch.zeros_like(h0)
        dnn = torch.zeros_like(h0)
        dmn = torch.zeros_like(h0)
        per_t = [x.unbind(0) for x in (i, f, z, a1, a2, a3, a4, c_prev, n_prev, sf, sel,
                                        dhs, dcs, dns, dms, D)]
        for t in range(T - 1, -1, -1):
            (i_t, f_t, z_t, a1_t, a2_t, a3_t, a4_t, cp_t, np_t, sf_t, sel_t,
             dh_in, dc_in, dn_in, dm_in, D_t) = (x[t] for x in per_t)
            di_raw, df_raw, dz_raw, do_raw = D_t.unbind(2)
            H = dh_in + dhn
            Ct = torch.addcmul(dc_in + dcn, H, a1_t)
            Nt = torch.addcmul(dn_in + dnn, H, a2_t)
            M = dm_in + dmn
            torch.mul(H, a3_t, out=do_raw)
            torch.mul(Ct, a4_t, out=dz_raw)
            P = torch.addcmul(Nt, z_t, Ct).mul_(i_t)        # d i~ through i (before the max)
            Q = torch.addcmul(cp_t * Ct, np_t, Nt).mul_(f_t)  # d l through f
            # m' = max(i~, l): its gradient M - P - Q goes to the larger argument
            torch.where(sel_t, M - Q, P, out=di_raw)
            dl = torch.where(sel_t, Q, M - P)
            torch.mul(dl, sf_t, out=df_raw)
            dcn = Ct * f_t
            dnn = Nt * f_t
            dmn = dl
            dhn = _matmul(D_t.view(N, B, 4 * dh), rT)
        Dg = D.view(T, N, B, 4 * dh)
        return Dg, weight_grad(h0, hs, Dg), dhn, dcn, dnn, dmn
