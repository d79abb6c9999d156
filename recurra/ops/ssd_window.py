"""Sliding-window SSD via the state difference ("Stuffed Mamba", Chen et al., arXiv 2410.07145).

The windowed state keeps only the last ``w`` inputs. By linearity it is the full state minus the
decayed state from ``w`` steps ago, which gives a constant-cost update:

    h_t = a_t h_{t-1} + x_t B_t^T - (a_{t-w+1} ... a_t) x_{t-w} B_{t-w}^T        y_t = h_t C_t

The update needs the input of ``w`` steps ago, so the state is ``h`` plus a buffer of the last
``w`` inputs ``(x, B, log_a)`` (oldest first): memory constant in T, linear in ``w``.
Shapes as in ``recurra.ops.ssd``; buffers ``(x (b, w, H, P), B (b, w, G, N), log_a (b, w, H))``.

- ``ssd_window_reference``: the update above, one step at a time (the oracle).
- ``ssd_window_chunked``: the banded parallel form. Prepend the buffer to the sequence; then
  ``h_t = (a_1 ... a_t) d + sum_{t-w < j <= t} (a_{j+1} ... a_t) x_j B_j^T`` where
  ``d = h_0 - sum_{j in buffer} (a_{j+1} ... a_0) x_j B_j^T`` is whatever part of ``h_0`` the
  buffer does not explain (zero for a state this op produced from an empty one). With chunks of
  ``w`` steps, output chunk c reads chunks c and c-1 only: a (w x 2w) banded quadratic form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ssd import _heads, check_ssd_inputs, segsum


def _check_buffers(x, B, buffers):
    if len(buffers) != 3:
        raise ValueError(f"buffers must hold 3 tensors (x, B, log_a), got {len(buffers)}")
    bx, bB, bla = buffers
    b, _, h, p = x.shape
    w = bx.shape[1] if bx.dim() == 4 else -1
    if (bx.dim() != 4 or w < 1 or tuple(bx.shape) != (b, w, h, p)
            or tuple(bB.shape) != (b, w, *B.shape[2:]) or tuple(bla.shape) != (b, w, h)):
        raise ValueError(
            f"buffers must have shapes (batch, window, heads, head_dim), (batch, window, groups, "
            f"state), (batch, window, heads) matching x {tuple(x.shape)} and B {tuple(B.shape)}, "
            f"got {[tuple(a.shape) for a in buffers]}")
    return w


def ssd_window_reference(x, log_a, B, C, initial_state, buffers):
    """The windowed update one step at a time. Returns ``(y, h, buffers)``."""
    _, per_group, h = check_ssd_inputs(x, log_a, B, C, initial_state)
    _check_buffers(x, B, buffers)
    bx, bB, bla = buffers
    Ch = _heads(C, per_group)
    ys = []
    for t in range(x.shape[1]):
        window_decay = (bla[:, 1:].sum(1) + log_a[:, t]).exp()           # a_{t-w+1} ... a_t
        old = bx[:, 0].unsqueeze(-1) * _heads(bB[:, :1], per_group)[:, 0].unsqueeze(-2)
        new = x[:, t].unsqueeze(-1) * _heads(B[:, t:t + 1], per_group)[:, 0].unsqueeze(-2)
        h = log_a[:, t].exp()[..., None, None] * h + new - window_decay[..., None, None] * old
        ys.append((h @ Ch[:, t].unsqueeze(-1)).squeeze(-1))
        bx = torch.cat([bx[:, 1:], x[:, t:t + 1]], 1)
        bB = torch.cat([bB[:, 1:], B[:, t:t + 1]], 1)
        bla = torch.cat([bla[:, 1:], log_a[:, t:t + 1]], 1)
    y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)
    return y, h, (bx, bB, bla)


def _buffer_state(bx, bB, bla, per_group):
    """sum over the buffer of (a_{j+1} ... a_last) x_j B_j^T: the state it explains."""
    after = bla.flip(1).cumsum(1).flip(1) - bla                          # (b, w, H)
    return torch.einsum("bjhp,bjhn,bjh->bhpn", bx, _heads(bB, per_group), after.exp())


def ssd_window_chunked(x, log_a, B, C, initial_state, buffers, lengths=None):
    """Banded parallel form, equal to ``ssd_window_reference``. Returns ``(y, h, buffers)``.

    ``lengths`` (b,): row i's returned state and buffers are those after ``lengths[i]`` steps
    (the window slides over every step, so padding cannot simply be neutral).
    """
    g, per_group, h0 = check_ssd_inputs(x, log_a, B, C, initial_state)
    w = _check_buffers(x, B, buffers)
    bx, bB, bla = buffers
    b, t, h, p = x.shape
    n = B.shape[-1]
    delta = h0 - _buffer_state(bx, bB, bla, per_group)
    # extended sequence: buffer (chunk 0), then x padded to whole chunks
    nc = -(-t // w)
    pad = nc * w - t
    ex = F.pad(torch.cat([bx, x], 1), (0, 0, 0, 0, 0, pad))              # (b, (nc+1)w, H, P)
    eB = F.pad(torch.cat([bB, B], 1), (0, 0, 0, 0, 0, pad))
    ela = F.pad(torch.cat([bla, log_a], 1), (0, 0, 0, pad))
    X = ex.view(b, nc + 1, w, g, per_group, p).permute(0, 3, 4, 1, 2, 5)   # (b,g,k,nc+1,w,p)
    A = ela.view(b, nc + 1, w, g, per_group).permute(0, 3, 4, 1, 2)       # (b,g,k,nc+1,w)
    Bc = eB.view(b, nc + 1, w, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b,g,1,nc+1,w,n)
    Cc = F.pad(C, (0, 0, 0, 0, 0, pad)).view(b, nc, w, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)
    # pairs (previous chunk, current chunk) for each output chunk
    X2 = torch.cat([X[:, :, :, :-1], X[:, :, :, 1:]], -2)                # (b,g,k,nc,2w,p)
    A2 = torch.cat([A[:, :, :, :-1], A[:, :, :, 1:]], -1)                # (b,g,k,nc,2w)
    B2 = torch.cat([Bc[:, :, :, :-1], Bc[:, :, :, 1:]], -2)              # (b,g,1,nc,2w,n)
    L = segsum(A2)[..., w:, :].exp()                                    # rows: current chunk
    i = torch.arange(w, device=x.device).unsqueeze(1)
    j = torch.arange(2 * w, device=x.device).unsqueeze(0)
    band = (j > i) & (j <= i + w)                                       # t - w < j <= t
    scores = (Cc @ B2.transpose(-1, -2)) * L * band
    y = scores @ X2                                                     # (b,g,k,nc,w,p)
    # what the buffer does not explain decays without being cut off
    cum = ela[:, w:].cumsum(1)                                          # (b, nc*w, H)
    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * w, h, p)[:, :t]
    y = y + torch.einsum("bthn,bhpn,bth->bthp", _heads(C, per_group), delta,
                         cum[:, :t].exp())
    # final state and buffers at each row's length
    ends = (torch.full((b,), t, dtype=torch.long, device=x.device)
            if lengths is None else lengths)
    idx = ends.unsqueeze(1) + torch.arange(w, device=x.device)          # extended positions

    def take(a):
        return a.gather(1, idx.view(b, w, *([1] * (a.dim() - 2))).expand(-1, -1, *a.shape[2:]))

    new_buffers = (take(ex), take(eB), take(ela))
    cum0 = F.pad(cum, (0, 0, 1, 0))                                     # cum at step 0..
    decay_end = cum0.gather(1, ends.view(b, 1, 1).expand(-1, 1, h)).squeeze(1).exp()
    h_end = decay_end[..., None, None] * delta + _buffer_state(*new_buffers, per_group)
    return y, h_end, new_buffers
