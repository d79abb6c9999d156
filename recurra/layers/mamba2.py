"""Mamba-2: a selective state space layer in the chunked SSD form (Dao & Gu, 2024).

Block (per token): ``in_proj`` -> (z, xBC, dt); a short causal depthwise convolution + SiLU on
xBC (its last ``conv_kernel - 1`` inputs are part of the state); the SSD scan per head
(``recurra.ops.ssd``) with ``a_t = exp(dt_t A)``, input ``dt_t x_t``; skip ``D x_t``; gated
RMSNorm ``norm(y * silu(z))``; ``out_proj``.

State: ``(conv_state, ssm_state)`` of shapes (B, conv_kernel - 1, conv_dim) and
(B, heads, head_dim, d_state), plus, with ``window``, the window's buffers (see below).

Options against state collapse ("Stuffed Mamba", Chen et al., arXiv 2410.07145):

- ``decay_scale`` (>= 1 forgets more): ``a_t = exp(decay_scale * dt_t * A)``;
  ``insert_scale`` (<= 1 remembers less): the input is ``insert_scale * dt_t * x_t``.
  Both keep the chunked form.
- ``max_state_norm``: state normalisation; after every update each head's state is scaled
  back to this Frobenius norm when it exceeds it. Not a linear recurrence: with this option the
  layer runs the sequential scan (``ssd_reference``), which is slower; a UserWarning says so
  when the layer is built.
- ``window``: a sliding window of ``window`` tokens via the state difference
  ``h^w_t = h_t - (a_{t-w+1} ... a_t) h_{t-w}`` (see ``recurra.ops.ssd_window``): exact, with a
  state holding the last ``window`` inputs, so its memory is constant in T.

Long inputs run in blocks of ``block_tokens`` (default 1024, a multiple of ``chunk_size``) with
the state carried from block to block: the result is the same, bit for bit, because the blocks
are made of whole SSD chunks, but each block's temporaries are a fraction of the whole
sequence's, so they are reused from the heap and stay nearer the cache instead of being freshly
mapped (and page-faulted) at every call: a (4, 4096, 256) forward takes about 30% less time.
The window and state-normalisation variants run in one pass.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import chunked_scan_compiled
from ..ops.ssd import ssd_chunked, ssd_reference
from ..ops.ssd_window import ssd_window_chunked, ssd_window_reference
from .base import RecurrentLayer, run_in_blocks, time_mask
from .registry import register


class Mamba2(RecurrentLayer):
    """Mamba-2 mixer (see the module docstring).

    Args:
        d_model: input and output width.
        d_state: N, the state size per head.
        head_dim: P; ``expand * d_model`` must be divisible by it (heads = expand*d_model / P).
        expand: inner width factor.
        n_groups: groups of heads sharing B and C (heads must be divisible by it).
        conv_kernel: width of the causal depthwise convolution (>= 1; 1 means no mixing).
        chunk_size: chunk length of the SSD form.
        dt_min, dt_max: range of the initial step sizes (log-uniform).
        a_init_range: range of the initial -A (uniform).
        decay_scale, insert_scale, max_state_norm, window: see the module docstring.
        backend: ``"auto"`` (default) runs inference calls (no gradient needed, CPU, float32 or
            float64) through the compiled chunked scan (``recurra.ops.chunked_scan_compiled``:
            one pass, with the input scale and the skip ``D x`` folded in) and everything else
            through the torch ops; ``"torch"`` always runs the torch ops. Window and
            state-normalisation layers always run the torch ops.
    """

    def __init__(self, d_model: int, d_state: int = 64, head_dim: int = 64, expand: int = 2,
                 n_groups: int = 1, conv_kernel: int = 4, chunk_size: int = 64,
                 dt_min: float = 1e-3, dt_max: float = 0.1,
                 a_init_range: tuple[float, float] = (1.0, 16.0),
                 decay_scale: float = 1.0, insert_scale: float = 1.0,
                 max_state_norm: float | None = None, window: int | None = None,
                 norm_eps: float = 1e-5, backend: str = "auto"):
        super().__init__()
        self.backend = chunked_scan_compiled.check_backend(backend)
        d_inner = expand * d_model
        for name, v in (("d_state", d_state), ("head_dim", head_dim), ("expand", expand),
                        ("n_groups", n_groups), ("conv_kernel", conv_kernel),
                        ("chunk_size", chunk_size)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if d_inner % head_dim:
            raise ValueError(f"head_dim must divide expand * d_model = {d_inner}, got {head_dim}")
        heads = d_inner // head_dim
        if heads % n_groups:
            raise ValueError(f"n_groups must divide the number of heads ({heads}), "
                             f"got {n_groups}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        if decay_scale <= 0 or insert_scale <= 0:
            raise ValueError(f"decay_scale and insert_scale must be > 0, got {decay_scale}, "
                             f"{insert_scale}")
        if max_state_norm is not None and not max_state_norm > 0:
            raise ValueError(f"max_state_norm must be > 0 or None, got {max_state_norm!r}")
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window must be a positive int or None, got {window!r}")
        if window is not None and max_state_norm is not None:
            raise ValueError("window and max_state_norm cannot be combined")
        if max_state_norm is not None:
            warnings.warn("Mamba2(max_state_norm=...) runs the sequential scan: state "
                          "normalisation is not a linear recurrence, so it has no chunked form",
                          UserWarning, stacklevel=2)
        self.input_size = self.output_size = d_model
        self.d_inner, self.d_state, self.head_dim, self.heads = d_inner, d_state, head_dim, heads
        self.n_groups, self.conv_kernel, self.chunk_size = n_groups, conv_kernel, chunk_size
        self.decay_scale, self.insert_scale = float(decay_scale), float(insert_scale)
        self.max_state_norm, self.window, self.norm_eps = max_state_norm, window, norm_eps
        self.conv_dim = d_inner + 2 * n_groups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * n_groups * d_state + heads,
                                 bias=False)
        self.conv_weight = nn.Parameter(
            torch.empty(self.conv_dim, conv_kernel).uniform_(-1, 1) / math.sqrt(conv_kernel))
        self.conv_bias = nn.Parameter(torch.zeros(self.conv_dim))
        dt = torch.exp(torch.empty(heads).uniform_(math.log(dt_min), math.log(dt_max)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(*a_init_range).log())
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={getattr(self, k)}" for k in
                        ("decay_scale", "insert_scale", "max_state_norm", "window")
                        if getattr(self, k) not in (None, 1.0))
        return (f"d_model={self.input_size}, d_state={self.d_state}, heads={self.heads}, "
                f"head_dim={self.head_dim}, n_groups={self.n_groups}{extra}")

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        shapes = [(batch_size, self.conv_kernel - 1, self.conv_dim),
                  (batch_size, self.heads, self.head_dim, self.d_state)]
        if self.window is not None:  # the last `window` inputs: x*dt, B, log a
            w = self.window
            shapes += [(batch_size, w, self.heads, self.head_dim),
                       (batch_size, w, self.n_groups, self.d_state),
                       (batch_size, w, self.heads)]
        return shapes

    # ----------------------------------------------------------------- pieces
    def _conv(self, xbc, conv_state, lengths):
        """Causal depthwise conv over [conv_state, xbc]; returns output and the new state."""
        k = self.conv_kernel
        ext = torch.cat([conv_state, xbc], 1)                        # (B, k-1+T, C)
        t = xbc.shape[1]
        # k shifted multiply-adds (torch's depthwise conv1d takes a slow path on CPU), in place:
        # one pass over the (B, T, C) output per tap and no temporaries
        out = torch.addcmul(self.conv_bias, ext[:, :t], self.conv_weight[:, 0])
        for i in range(1, k):
            out.addcmul_(ext[:, i:i + t], self.conv_weight[:, i])
        if lengths is None:
            new_state = ext[:, t:]
        else:  # each row's last k-1 real inputs sit at ext[lengths : lengths + k-1]
            idx = lengths.unsqueeze(1) + torch.arange(k - 1, device=xbc.device)
            new_state = ext.gather(1, idx.unsqueeze(-1).expand(-1, -1, ext.shape[-1]))
        return out, new_state

    def _scan(self, x, log_a, B, C, state, lengths):
        if self.window is not None:
            buffers = state[2:]
            if x.shape[1] == 1 and lengths is None:
                y, h, buffers = ssd_window_reference(x, log_a, B, C, state[1], buffers)
            else:
                y, h, buffers = ssd_window_chunked(x, log_a, B, C, state[1], buffers,
                                                   lengths=lengths)
            return y, (h, *buffers)
        if self.max_state_norm is not None or x.shape[1] == 1:
            mask = None if lengths is None else time_mask(lengths, x.shape[1])
            y, h = ssd_reference(x, log_a, B, C, state[1], self.max_state_norm, mask)
        else:
            y, h = ssd_chunked(x, log_a, B, C, state[1], self.chunk_size)
        return y, (h,)

    #: tokens per block of a long input (rounded down to whole chunks; see the module docstring)
    block_tokens = 1024

    def _forward(self, x, state, lengths):
        if self.window is not None or self.max_state_norm is not None:
            return self._forward_block(x, state, lengths)
        return run_in_blocks(self._forward_block, x, state, lengths, self.block_tokens,
                             multiple=self.chunk_size)

    def _forward_block(self, x, state, lengths):
        b, t, _ = x.shape
        mask = None if lengths is None else time_mask(lengths, t).unsqueeze(-1)
        if mask is not None:
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        compiled = (self.window is None and self.max_state_norm is None and t > 1
                    and chunked_scan_compiled.serves(self.backend, x, self.D, *state))
        n_bc = self.n_groups * self.d_state
        z, xbc, dt = self.in_proj(x).split([self.d_inner, self.conv_dim, self.heads], -1)
        if compiled:
            xbc, conv_state = chunked_scan_compiled.causal_conv_silu(
                xbc, state[0], self.conv_weight, self.conv_bias, lengths)
        else:
            xbc, conv_state = self._conv(xbc, state[0], lengths)
            xbc = F.silu(xbc)
        xs, Bm, Cm = xbc.split([self.d_inner, n_bc, n_bc], -1)
        Bm = Bm.view(b, t, self.n_groups, self.d_state)
        Cm = Cm.view(b, t, self.n_groups, self.d_state)
        dt = F.softplus(dt + self.dt_bias)                          # (B, T, H)
        if mask is not None:  # padded steps: a = 1 and no input, so the state stays
            dt = dt * mask.to(dt.dtype)
        log_a = self.decay_scale * dt * -self.A_log.exp()
        xh = xs.view(b, t, self.heads, self.head_dim)
        if compiled:  # one pass: the scan with the input scale dt and the skip D x folded in
            y, h = chunked_scan_compiled.ssd_forward(xh, log_a, Bm, Cm, state[1],
                                                     self.chunk_size,
                                                     x_scale=self.insert_scale * dt, D=self.D)
            y = chunked_scan_compiled.gated_rms_norm(y.view(b, t, self.d_inner), z,
                                                     self.norm_weight, self.norm_eps)
            ssm_state = (h,)
        else:
            y, ssm_state = self._scan(xh * (self.insert_scale * dt).unsqueeze(-1), log_a, Bm, Cm,
                                      state, lengths)
            y = torch.addcmul(y, xh, self.D.unsqueeze(-1)).reshape(b, t, self.d_inner)
            y = F.rms_norm(y * F.silu(z), (self.d_inner,), self.norm_weight, self.norm_eps)
        y = self.out_proj(y)
        if mask is not None:
            y = y * mask
        return y, (conv_state, *ssm_state)


@register("mamba2", "Mamba-2 selective SSM (chunked SSD) with short conv; Stuffed-Mamba options "
                    "decay_scale, insert_scale, max_state_norm, window")
def build_mamba2(d_model: int, **options) -> Mamba2:
    return Mamba2(d_model, **options)
