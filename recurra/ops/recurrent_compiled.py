"""The classic cells' time loops compiled in C++ (``backend="compiled"``).

The same autograd structure as ``recurrent_fused`` (gates stored in the forward, a short backward
loop, the recurrent-weight gradient as one batched matmul after it), with both time loops in C++
(``csrc/recurrent_cells.cpp``): per step one BLAS matmul and one vectorised pass over the gates,
so no Python runs per step. Read ``recurrent_cells.recurrence_reference`` for the math.

The extension is compiled on first use (see ``recurra.ops.cpp_extension``: a C++ compiler and
ninja, about a minute once per machine). ``available()`` says whether it can serve and
``unavailable_reason()`` why not; ``load()`` raises with that reason.
"""

from __future__ import annotations

import torch
from torch.autograd import Function

from .cpp_extension import CompiledExtension
from .recurrent_fused import weight_grad

EXTENSION = CompiledExtension("recurra_recurrent_cells", ("recurrent_cells.cpp",),
                              "recurrent kernels", openmp=True)


def load():
    """The compiled extension module, built on first use; RuntimeError with the reason if it
    cannot be built here."""
    return EXTENSION.load()


def release_cache() -> int:
    """Free the buffers the compiled loops keep for reuse (the C++ side recycles freed (T, ...)
    buffers of 1 MiB and more, up to 1 GiB in all, so that the next call of the same shape skips
    the page faults of fresh memory); returns the bytes freed. Nothing to do if never built."""
    return EXTENSION.module.release_cache() if EXTENSION.module is not None else 0


def available() -> bool:
    """Whether the compiled backend can serve (builds it on first call)."""
    return EXTENSION.available()


def unavailable_reason() -> str | None:
    """Why the compiled backend cannot serve, or None if it can (builds it on first call)."""
    return EXTENSION.unavailable_reason()


def recurrence(cell, wx, r, state0, bias_hn=None, nonlinearity="tanh", panels=None):
    """Same arguments and results as ``recurrent_fused.recurrence`` (already validated there).

    ``panels``: the row-exact product for inference (``recurra.ops.row_exact``): ``r`` packed
    head by head in column panels, (N, P, dh, 32) (:func:`pack_recurrent`). Each row's states
    are then bitwise the same whatever the other rows; no gradient flows (forward only)."""
    if wx.device.type != "cpu":
        raise ValueError(f"backend='compiled' runs on the CPU, got wx on {wx.device}")
    ext = load()
    if cell == "gru" and bias_hn is None:
        bias_hn = wx.new_zeros(r.shape[0], 1, r.shape[1])
    if panels is not None:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (wx, r, *state0)):
            raise ValueError("panels (the row-exact product) serve inference only: call under "
                             "torch.no_grad(), or pass panels=None to get gradients")
        if cell == "lstm":
            return tuple(ext.lstm_forward(wx, r, *state0, panels)[:2])
        if cell == "gru":
            return (ext.gru_forward(wx, r, bias_hn, state0[0], panels)[0],)
        if cell == "elman":
            return (ext.elman_forward(wx, r, state0[0], nonlinearity == "relu", panels)[0],)
        return tuple(ext.slstm_forward(wx, r, *state0, panels)[:4])
    if cell == "lstm":
        return _LSTM.apply(ext, wx, r, *state0)
    if cell == "gru":
        return (_GRU.apply(ext, wx, r, bias_hn, state0[0]),)
    if cell == "elman":
        return (_Elman.apply(ext, wx, r, state0[0], nonlinearity == "relu"),)
    return _SLSTM.apply(ext, wx, r, *state0)


def pack_recurrent(r: torch.Tensor) -> torch.Tensor:
    """``r`` (N, dh, W), every head's (dh, W) matrix packed in column panels: (N, P, dh, 32)
    (``recurra.ops.streamed_matmul.pack_panels`` head by head), for ``recurrence(panels=...)``."""
    from .streamed_matmul import pack_panels
    return torch.stack([pack_panels(r[n]) for n in range(r.shape[0])])


class _Elman(Function):
    @staticmethod
    def forward(ctx, ext, wx, r, h0, relu):
        (hs,) = ext.elman_forward(wx, r, h0, relu, None)
        ctx.ext, ctx.relu = ext, relu
        ctx.save_for_backward(r, h0, hs)
        return hs

    @staticmethod
    def backward(ctx, dhs):
        r, h0, hs = ctx.saved_tensors
        D, dh0 = ctx.ext.elman_backward(dhs, r, hs, ctx.relu)
        return None, D, weight_grad(h0, hs, D), dh0, None


class _GRU(Function):
    @staticmethod
    def forward(ctx, ext, wx, r, bias_hn, h0):
        hs, rz, ns, hrn = ext.gru_forward(wx, r, bias_hn, h0, None)
        ctx.ext = ext
        ctx.save_for_backward(r, h0, hs, rz, ns, hrn)
        return hs

    @staticmethod
    def backward(ctx, dhs):
        r, h0, hs, rz, ns, hrn = ctx.saved_tensors
        dwx, dhn, dh0 = ctx.ext.gru_backward(dhs, r, h0, hs, rz, ns, hrn)
        dh = hs.shape[-1]
        # d(R h + (0, 0, b_hn)) = (dwx's r and z parts, dhn): two matmuls, no concatenation
        dr = torch.cat([weight_grad(h0, hs, dwx[..., :2 * dh]), weight_grad(h0, hs, dhn)], -1)
        return None, dwx, dr, dhn.sum((0, 2)).unsqueeze(1), dh0


class _LSTM(Function):
    @staticmethod
    def forward(ctx, ext, wx, r, h0, c0):
        hs, cs, acts = ext.lstm_forward(wx, r, h0, c0, None)
        ctx.ext = ext
        ctx.save_for_backward(r, h0, c0, acts, hs, cs)
        return hs, cs

    @staticmethod
    def backward(ctx, dhs, dcs):
        r, h0, c0, acts, hs, cs = ctx.saved_tensors
        D, dh0, dc0 = ctx.ext.lstm_backward(dhs, dcs, r, c0, acts, cs)
        return None, D, weight_grad(h0, hs, D), dh0, dc0


class _SLSTM(Function):
    @staticmethod
    def forward(ctx, ext, wx, r, h0, c0, n0, m0):
        hs, cs, ns, ms, acts, sf, sel = ext.slstm_forward(wx, r, h0, c0, n0, m0, None)
        ctx.ext = ext
        ctx.save_for_backward(r, h0, c0, n0, acts, sf, sel, hs, cs, ns)
        return hs, cs, ns, ms

    @staticmethod
    def backward(ctx, dhs, dcs, dns, dms):
        r, h0, c0, n0, acts, sf, sel, hs, cs, ns = ctx.saved_tensors
        D, dh0, dc0, dn0, dm0 = ctx.ext.slstm_backward(dhs, dcs, dns, dms, r, c0, n0, acts, sf,
                                                       sel, hs, cs, ns)
        return None, D, weight_grad(h0, hs, D), dh0, dc0, dn0, dm0

