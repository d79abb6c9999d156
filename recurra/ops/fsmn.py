"""FSMN memory: a learnable per-channel FIR filter over past and future frames.

For frames ``p`` of shape (B, T, D) the memory of frame t is

    m_t = sum_{i=0..N1} a_i * p[t - s1*i]  +  sum_{j=1..N2} c_j * p[t + s2*j]

with lookback taps ``a`` (N1+1, D), lookback stride ``s1``, lookahead taps ``c`` (N2, D) and
lookahead stride ``s2`` (``*`` is elementwise over the D channels). Frames before the sequence come
from ``history`` (B, N1*s1, D), oldest first (zeros when not given); frames after its end are zero.

Three forms of the same function:
- :func:`fsmn_memory_reference`: the plain tap loop (the oracle);
- :func:`fsmn_memory`: two dilated depthwise ``conv1d`` calls (the fast parallel form);
- :func:`fsmn_memory_step`: one frame in, the memory of the frame ``N2*s2`` steps back out, using a
  shift register of the last ``N1*s1 + N2*s2`` frames (constant memory; output delayed by the
  lookahead ``N2*s2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lookback_span(order: int, stride: int) -> int:
    """Number of past frames the lookback taps reach: ``order * stride``."""
    return order * stride


def _check(p: torch.Tensor, lookback: torch.Tensor, lookahead: torch.Tensor,
           lookback_stride: int, lookahead_stride: int) -> None:
    if p.dim() != 3:
        raise ValueError(f"p must have shape (batch, time, channels), got {tuple(p.shape)}")
    d = p.shape[-1]
    if lookback.dim() != 2 or lookback.shape[1] != d or lookback.shape[0] < 1:
        raise ValueError(
            f"lookback taps must have shape (order + 1, {d}), got {tuple(lookback.shape)}")
    if lookahead.dim() != 2 or lookahead.shape[1] != d:
        raise ValueError(f"lookahead taps must have shape (order, {d}), got {tuple(lookahead.shape)}")
    for name, s in (("lookback_stride", lookback_stride), ("lookahead_stride", lookahead_stride)):
        if not isinstance(s, int) or s < 1:
            raise ValueError(f"{name} must be a positive int, got {s!r}")


def _history(p: torch.Tensor, history: torch.Tensor | None, span: int) -> torch.Tensor:
    b, _, d = p.shape
    if history is None:
        return p.new_zeros(b, span, d)
    if tuple(history.shape) != (b, span, d):
        raise ValueError(f"history must have shape ({b}, {span}, {d}) (batch, lookback order * "
                         f"stride, channels), got {tuple(history.shape)}")
    return history


def fsmn_memory_reference(p, lookback, lookahead, lookback_stride=1, lookahead_stride=1,
                          history=None):
    """The tap loop: returns m (B, T, D) as defined in the module docstring."""
    _check(p, lookback, lookahead, lookback_stride, lookahead_stride)
    n1, n2 = lookback.shape[0] - 1, lookahead.shape[0]
    span = n1 * lookback_stride
    past = _history(p, history, span)
    frames = torch.cat([past, p], 1)  # frame t of p is frames[span + t]
    steps = p.shape[1]
    out = []
    for t in range(steps):
        m = torch.zeros_like(p[:, 0])
        for i in range(n1 + 1):
            m = m + lookback[i] * frames[:, span + t - lookback_stride * i]
        for j in range(1, n2 + 1):
            if t + lookahead_stride * j < steps:
                m = m + lookahead[j - 1] * p[:, t + lookahead_stride * j]
        out.append(m)
    return torch.stack(out, 1) if out else p.new_zeros(p.shape)


def fsmn_memory(p, lookback, lookahead, lookback_stride=1, lookahead_stride=1, history=None):
    """Parallel form: dilated depthwise convolutions. Same result as the reference."""
    _check(p, lookback, lookahead, lookback_stride, lookahead_stride)
    d = p.shape[-1]
    n1, n2 = lookback.shape[0] - 1, lookahead.shape[0]
    span = n1 * lookback_stride
    past = _history(p, history, span)
    seq = torch.cat([past, p], 1).transpose(1, 2)  # (B, D, span + T)
    # conv1d: out[t] = sum_k w[k] * in[t + k*dilation]; tap i reads in[span + t - s1*i], k = n1 - i
    w_back = lookback.flip(0).t().unsqueeze(1)  # (D, 1, n1 + 1)
    m = F.conv1d(seq, w_back, groups=d, dilation=lookback_stride)
    if n2 > 0:
        ahead = n2 * lookahead_stride
        fut = F.pad(p.transpose(1, 2), (0, ahead))[:, :, lookahead_stride:]
        w_ahead = lookahead.t().unsqueeze(1)  # (D, 1, n2): k = j - 1 reads p[t + s2*(k+1)]
        m = m + F.conv1d(fut, w_ahead, groups=d, dilation=lookahead_stride)
    return m.transpose(1, 2)


def fsmn_memory_step(p_t, buffer, lookback, lookahead, lookback_stride=1, lookahead_stride=1):
    """One step of the streaming form.

    ``buffer`` (B, N1*s1 + N2*s2, D) holds the last frames before ``p_t`` (oldest first). Returns
    ``(m, new_buffer)`` where ``m`` is the memory of the frame ``N2*s2`` steps before ``p_t``
    (the lookahead delay); with N2 = 0 it is the memory of ``p_t`` itself.
    """
    n1, n2 = lookback.shape[0] - 1, lookahead.shape[0]
    back, ahead = n1 * lookback_stride, n2 * lookahead_stride
    if p_t.dim() != 2 or p_t.shape[-1] != lookback.shape[1]:
        raise ValueError(f"p_t must have shape (batch, {lookback.shape[1]}), got {tuple(p_t.shape)}")
    if tuple(buffer.shape) != (p_t.shape[0], back + ahead, p_t.shape[1]):
        raise ValueError(f"buffer must have shape ({p_t.shape[0]}, {back + ahead}, {p_t.shape[1]}),"
                         f" got {tuple(buffer.shape)}")
    window = torch.cat([buffer, p_t.unsqueeze(1)], 1)  # the frame being output sits at `back`
    back_idx = torch.arange(back, -1, -lookback_stride, device=p_t.device)  # i = 0..n1
    m = (lookback.unsqueeze(0) * window[:, back_idx]).sum(1)
    if n2 > 0:
        ahead_idx = back + lookahead_stride * torch.arange(1, n2 + 1, device=p_t.device)
        m = m + (lookahead.unsqueeze(0) * window[:, ahead_idx]).sum(1)
    return m, window[:, 1:]
