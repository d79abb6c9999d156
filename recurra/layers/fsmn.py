"""FSMN / DFSMN memory layer and the dilated, gated variant (MossFormer2's gated FSMN).

Plain (DFSMN) block, for input x_t (B, T, d_model):

    p_t  = V relu(U x_t + b)                        (low-rank projection, hidden_size wide)
    z^0  = p;   z^{l+1}_t = z^l_t + m^l_t            (l = 0..L-1, ``dilation_levels`` = L)
    m^l_t = sum_{i=0..N1} a^l_i * z^l[t - s1 2^l i] + sum_{j=1..N2} c^l_j * z^l[t + s2 2^l j]
    y_t  = x_t + z^L_t                               (the DFSMN skip; without ``skip``: z^L_t)

With L = 1 this is the DFSMN memory block ``p~ = p~^{l-1} + p + sum a p + sum c p``; with L > 1
the memory is a cascade of FIR stages whose strides double (the dilated FSMN of MossFormer2).

Gated variant (``gated=True``): u = SiLU(W_u LN(x)), v = SiLU(W_v LN(x)); the block above runs on
u (its skip adds u), and ``y = v * block(u) + x``. Deviations from MossFormer2, made so the layer
streams: no InstanceNorm in the dilated stack (it normalises over the whole sequence) and no
depthwise conv inside the u/v projections; the dilated stack is a residual cascade rather than a
densely concatenated one.

Streaming.
- ``lookahead_order == 0`` (causal): ``step`` is exact with constant memory (the state holds the
  last N1*s1*2^l frames of each stage's input, advanced by the shift-register op); the layer
  passes the whole contract.
- ``lookahead_order > 0``: the layer reads the future, so ``causal = False`` and ``step`` raises.
  ``stream_step`` gives output t - ``delay`` when frame t arrives (``delay = sum_l N2 s2 2^l``,
  zeros for the first ``delay`` calls of a fresh stream) and ``stream_flush`` returns the last
  ``delay`` outputs, so ``cat(stream outputs[delay:], flush)`` equals ``layer(x)``.
  Its ``forward(x, state)`` treats the end of ``x`` as the end of the sequence (the future past it
  is zero); ``state`` carries the lookback history only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.fsmn import fsmn_memory, fsmn_memory_step
from .base import RecurrentLayer, State, time_mask
from .registry import register


class FSMNLayer(RecurrentLayer):
    """(D)FSMN memory block; see the module docstring."""

    def __init__(self, d_model: int, hidden_size: int | None = None, lookback_order: int = 4,
                 lookback_stride: int = 1, lookahead_order: int = 0, lookahead_stride: int = 1,
                 skip: bool = True, gated: bool = False, dilation_levels: int = 1):
        super().__init__()
        for name, v, lo in (("d_model", d_model, 1), ("lookback_order", lookback_order, 0),
                            ("lookback_stride", lookback_stride, 1),
                            ("lookahead_order", lookahead_order, 0),
                            ("lookahead_stride", lookahead_stride, 1),
                            ("dilation_levels", dilation_levels, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        hidden_size = 2 * d_model if hidden_size is None else hidden_size
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.input_size = self.output_size = d_model
        self.hidden_size = hidden_size
        self.lookback_order, self.lookahead_order = lookback_order, lookahead_order
        self.lookback_stride, self.lookahead_stride = lookback_stride, lookahead_stride
        self.skip, self.gated, self.dilation_levels = skip, gated, dilation_levels
        self.causal = lookahead_order == 0
        self.strides = [(lookback_stride * 2 ** l, lookahead_stride * 2 ** l)
                        for l in range(dilation_levels)]
        self.backs = [lookback_order * s1 for s1, _ in self.strides]
        self.aheads = [lookahead_order * s2 for _, s2 in self.strides]
        #: output delay of ``stream_step`` (frames)
        self.delay = sum(self.aheads)
        if gated:
            self.norm = nn.LayerNorm(d_model)
            self.to_u = nn.Linear(d_model, d_model)
            self.to_v = nn.Linear(d_model, d_model)
        self.up = nn.Linear(d_model, hidden_size)
        self.down = nn.Linear(hidden_size, d_model, bias=False)
        scale = 1.0 / math.sqrt(lookback_order + lookahead_order + 1)
        self.lookback = nn.ParameterList(
            [nn.Parameter(scale * torch.randn(lookback_order + 1, d_model))
             for _ in range(dilation_levels)])
        self.lookahead = nn.ParameterList(
            [nn.Parameter(scale * torch.randn(lookahead_order, d_model))
             for _ in range(dilation_levels)])

    # ------------------------------------------------------------------ pieces
    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return [(batch_size, back, self.input_size) for back in self.backs]

    def _gate_inputs(self, x):
        """(u, v): the block's input and the gate (v is None for the plain block)."""
        if not self.gated:
            return x, None
        h = self.norm(x)
        return nn.functional.silu(self.to_u(h)), nn.functional.silu(self.to_v(h))

    def _project(self, u):
        return self.down(torch.relu(self.up(u)))

    def _combine(self, x, u, v, z):
        core = z + u if self.skip else z
        return v * core + x if self.gated else core

    # ------------------------------------------------------------------ parallel form
    def _forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        steps = x.shape[1]
        mask = None if lengths is None else time_mask(lengths, steps).unsqueeze(-1)
        u, v = self._gate_inputs(x)
        z = self._project(u)
        finals = []
        for l, (s1, s2) in enumerate(self.strides):
            if mask is not None:
                z = torch.where(mask, z, torch.zeros((), dtype=z.dtype, device=z.device))
            finals.append(_last_frames(state[l], z, self.backs[l], lengths))
            z = z + fsmn_memory(z, self.lookback[l], self.lookahead[l], s1, s2, history=state[l])
        y = self._combine(x, u, v, z)
        if mask is not None:
            y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))
        return y, tuple(finals)

    # ------------------------------------------------------------------ causal step
    def step(self, x_t: torch.Tensor, state: State | None = None):
        """One frame of a causal FSMN with the shift-register op (an implementation independent of
        the convolution in ``forward``; the contract tests hold the two equal)."""
        if not self.causal:
            return super().step(x_t, state)  # raises: a lookahead layer has stream_step instead
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[1] != self.input_size:
            raise ValueError(f"x_t must have shape (batch, {self.input_size}) for step(), got "
                             f"{tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else x_t!r}")
        if state is None:
            state = self.init_state(x_t.shape[0], device=x_t.device, dtype=x_t.dtype)
        else:
            state = self.check_state(state, x_t.unsqueeze(1))
        u, v = self._gate_inputs(x_t)
        z = self._project(u)
        new = []
        for l, (s1, s2) in enumerate(self.strides):
            m, buf = fsmn_memory_step(z, state[l], self.lookback[l], self.lookahead[l], s1, s2)
            new.append(buf)
            z = z + m
        return self._combine(x_t, u, v, z), tuple(new)

    # ------------------------------------------------------------------ delayed streaming
    def init_stream_state(self, batch_size: int, device=None, dtype=None) -> State:
        """State of a fresh stream: (frames fed (B,) long, last ``delay`` inputs, stage buffers)."""
        ref = self.up.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        d = self.input_size
        return (torch.zeros(batch_size, dtype=torch.long, device=device),
                torch.zeros(batch_size, self.delay, d, device=device, dtype=dtype),
                *(torch.zeros(batch_size, b + a, d, device=device, dtype=dtype)
                  for b, a in zip(self.backs, self.aheads)))

    def stream_step(self, x_t: torch.Tensor, stream_state: State | None = None):
        """Feed frame t (B, D); returns (output of frame t - delay, new stream state).

        Constant memory. For a fresh stream the first ``delay`` outputs are zeros (frames
        before the start); after the last frame call :meth:`stream_flush` for the remaining ones.
        """
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2 or x_t.shape[1] != self.input_size:
            raise ValueError(f"x_t must have shape (batch, {self.input_size}), got "
                             f"{tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else x_t!r}")
        if stream_state is None:
            stream_state = self.init_stream_state(x_t.shape[0], x_t.device, x_t.dtype)
        u, _ = self._gate_inputs(x_t)
        return self._advance(self._project(u), x_t, stream_state, end=None)

    def stream_flush(self, stream_state: State) -> torch.Tensor:
        """The last ``delay`` outputs (B, delay, D) of a stream, as if the future were zero."""
        pos, x_buf = stream_state[0], stream_state[1]
        b, d = x_buf.shape[0], self.input_size
        zero = x_buf.new_zeros(b, d)
        outs = []
        for _ in range(self.delay):
            y, stream_state = self._advance(zero, zero, stream_state, end=pos)
            outs.append(y)
        return torch.stack(outs, 1) if outs else x_buf.new_zeros(b, 0, d)

    def _advance(self, p_t, x_t, stream_state, end):
        pos, x_buf, *bufs = stream_state
        z, lag, new_bufs = p_t, 0, []
        for l, (s1, s2) in enumerate(self.strides):
            back, ahead = self.backs[l], self.aheads[l]
            centre = bufs[l][:, back] if ahead > 0 else z
            m, nb = fsmn_memory_step(z, bufs[l], self.lookback[l], self.lookahead[l], s1, s2)
            new_bufs.append(nb)
            lag += ahead
            z = torch.where(_valid(pos - lag, end).unsqueeze(-1), centre + m,
                            torch.zeros((), dtype=z.dtype, device=z.device))
        window = torch.cat([x_buf, x_t.unsqueeze(1)], 1)
        x_out = window[:, 0]
        u, v = self._gate_inputs(x_out)
        y = self._combine(x_out, u, v, z)
        y = torch.where(_valid(pos - lag, end).unsqueeze(-1), y,
                        torch.zeros((), dtype=y.dtype, device=y.device))
        return y, (pos + 1, window[:, 1:], *new_bufs)


def _valid(tau: torch.Tensor, end: torch.Tensor | None) -> torch.Tensor:
    ok = tau >= 0
    return ok if end is None else ok & (tau < end)


def _last_frames(history: torch.Tensor, z: torch.Tensor, span: int,
                 lengths: torch.Tensor | None) -> torch.Tensor:
    """The ``span`` frames ending at each row's length of cat(history, z)."""
    if span == 0:
        return history
    frames = torch.cat([history, z], 1)
    if lengths is None:
        return frames[:, frames.shape[1] - span:]
    idx = lengths.unsqueeze(1) + torch.arange(span, device=z.device).unsqueeze(0)  # (B, span)
    return frames.gather(1, idx.unsqueeze(-1).expand(-1, -1, z.shape[-1]))


@register("fsmn", "FSMN/DFSMN memory block (lookback/lookahead FIR taps, strides, skip); "
                  "gated=True, dilation_levels>1 for MossFormer2's dilated gated FSMN")
def build_fsmn(d_model: int, **options) -> FSMNLayer:
    return FSMNLayer(d_model, **options)
