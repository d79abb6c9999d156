"""Classic recurrent cells with block-diagonal (multi-head) recurrence: the readable reference.

Every cell computes gate pre-activations ``g_t = Wx_t + R h_{t-1}`` (input projection and biases
already in ``Wx``), then a pointwise update. With ``N`` heads of size ``dh`` the recurrent matrix
is block-diagonal: head n only reads its own ``dh`` hidden units (FlashRNN's multi-head cells).

Layout used by the ops (the layers convert to and from batch-first):
- ``wx``: (T, N, B, G*dh), gates in torch.nn order (LSTM: i, f, g, o; GRU: r, z, n; sLSTM:
  i, f, z, o), each gate a contiguous block of ``dh``;
- ``r``: (N, dh, G*dh), so that ``g = wx_t + bmm(h, r)`` for ``h`` of shape (N, B, dh);
- a state is a tuple of (N, B, dh) tensors, h first;
- the result is a tuple of (T, N, B, dh) tensors: every state component after every step.

Cells and states:
- ``lstm`` (h, c): i, f, o = sigmoid, g = tanh; c' = f c + i g; h' = o tanh(c').
- ``gru`` (h,): r, z = sigmoid(wx_rz + (R h)_rz); n = tanh(wx_n + r * ((R h)_n + b_hn));
  h' = (1 - z) n + z h  (torch.nn.GRU's equations; ``b_hn`` stays inside the reset gate).
- ``elman`` (h,): h' = tanh(wx + R h) or relu(wx + R h).
- ``slstm`` (h, c, n, m): exponential input gate with the max-stabiliser m (xLSTM/FlashRNN):
  m' = max(i~, log sigmoid(f~) + m); i = exp(i~ - m'); f = exp(log sigmoid(f~) + m - m');
  c' = f c + i tanh(z~); n' = f n + i; h' = sigmoid(o~) c' / n'.
"""

from __future__ import annotations

import torch

CELLS = {
    # name: (number of gates, number of state components)
    "lstm": (4, 2),
    "gru": (3, 1),
    "elman": (1, 1),
    "slstm": (4, 4),
}


def lstm_pointwise(g, state):
    h, c = state
    i, f, gg, o = g.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
    h = torch.sigmoid(o) * torch.tanh(c)
    return h, c


def gru_pointwise(wx, hr, state, bias_hn):
    """``wx`` input part (r, z, n), ``hr`` = R h (r, z, n) without b_hn."""
    (h,) = state
    xr, xz, xn = wx.chunk(3, -1)
    hr_r, hr_z, hr_n = hr.chunk(3, -1)
    r = torch.sigmoid(xr + hr_r)
    z = torch.sigmoid(xz + hr_z)
    n = torch.tanh(xn + r * (hr_n + bias_hn))
    return ((1 - z) * n + z * h,)


def elman_pointwise(g, state, nonlinearity="tanh"):
    return (torch.tanh(g) if nonlinearity == "tanh" else torch.relu(g),)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), stable for any x.

    (Written out because torch's CPU ``log_sigmoid`` kernel costs ~28 ms per call here,
    whatever the size, on a loaded 2-core machine.)
    """
    return torch.clamp(x, max=0) - torch.log1p(torch.exp(-x.abs()))


def slstm_pointwise(g, state):
    h, c, n, m = state
    i_raw, f_raw, z_raw, o_raw = g.chunk(4, -1)
    log_f_plus_m = log_sigmoid(f_raw) + m
    m_new = torch.maximum(i_raw, log_f_plus_m)
    i = torch.exp(i_raw - m_new)
    f = torch.exp(log_f_plus_m - m_new)
    c_new = f * c + i * torch.tanh(z_raw)
    n_new = f * n + i
    h_new = torch.sigmoid(o_raw) * c_new / n_new
    return h_new, c_new, n_new, m_new


def recurrence_reference(
    cell: str,
    wx: torch.Tensor,
    r: torch.Tensor,
    state0: tuple[torch.Tensor, ...],
    bias_hn: torch.Tensor | None = None,
    nonlinearity: str = "tanh",
) -> tuple[torch.Tensor, ...]:
    """The plain loop over time (autograd does the backward). See the module docstring."""
    state = tuple(state0)
    outs: list[tuple[torch.Tensor, ...]] = []
    for wx_t in wx.unbind(0):
        h = state[0]
        if cell == "gru":
            state = gru_pointwise(wx_t, torch.bmm(h, r), state, bias_hn)
        else:
            g = torch.baddbmm(wx_t, h, r)
            if cell == "lstm":
                state = lstm_pointwise(g, state)
            elif cell == "elman":
                state = elman_pointwise(g, state, nonlinearity)
            elif cell == "slstm":
                state = slstm_pointwise(g, state)
            else:
                raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        outs.append(state)
    return tuple(torch.stack(parts, 0) for parts in zip(*outs))
