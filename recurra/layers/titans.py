"""Titans (Behrouz et al., arXiv 2501.00663): neural long-term memory, and the MAG / MAL blocks.

``variant``:
- ``"lmm"``: the long-term memory alone. Per head: q = l2norm(W_Q x), k = l2norm(W_K x), v = W_V x,
  theta = max_lr * sigmoid(.), eta = sigmoid(.), alpha = sigmoid(.) (linear maps of x); the MLP
  memory learns k -> v at test time (see :mod:`recurra.ops.titans_memory`) and y = W_O M_t(q_t).
- ``"mag"`` (memory as a gate): y = W_O( SWA(x) * sigmoid(LMM(x)) ), where SWA is sliding-window
  attention of width ``window`` with ``persistent`` learned key/value tokens always visible.
- ``"mal"`` (memory as a layer): y = W_O SWA( W_M LMM(x) ).

State (batch first): the memory weights, momentum, base weights (one tensor (B, H, ., .) per MLP
matrix each), the chunk phase (B,) and, for MAG/MAL, the attention cache: keys, values
(B, window - 1, H, head_dim) and their 0/1 valid flags (B, window - 1). Everything is constant in
the sequence length, so ``step`` runs in constant memory.

Simplifications against the paper (documented in docs/layers-zoo-b.md): no short depthwise conv on
q/k/v; gates per token (not per chunk); persistent tokens enter the attention only (not the memory);
MAC (memory as context) is not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sliding_window_attention import sliding_window_attention
from ..ops.titans_memory import neural_memory_chunked
from .base import RecurrentLayer, State
from .registry import register

VARIANTS = ("lmm", "mag", "mal")


class NeuralMemory(nn.Module):
    """Projections + MLP memory of Titans (a building block, not a layer by itself)."""

    def __init__(self, d_model: int, heads: int, head_dim: int, depth: int, hidden: int,
                 chunk: int, max_lr: float):
        super().__init__()
        if depth not in (1, 2):
            raise ValueError(f"memory_depth must be 1 or 2, got {depth!r}")
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        if not 0 < max_lr <= 1:
            raise ValueError(f"max_lr must lie in (0, 1], got {max_lr!r}")
        self.heads, self.head_dim, self.depth, self.chunk, self.max_lr = (
            heads, head_dim, depth, chunk, max_lr)
        inner = heads * head_dim
        self.to_q = nn.Linear(d_model, inner, bias=False)
        self.to_k = nn.Linear(d_model, inner, bias=False)
        self.to_v = nn.Linear(d_model, inner, bias=False)
        self.to_gates = nn.Linear(d_model, 3 * heads)
        with torch.no_grad():  # start with little forgetting and strong momentum
            self.to_gates.bias.view(3, heads)[1].fill_(2.0)
            self.to_gates.bias.view(3, heads)[2].fill_(-4.0)
        dims = [head_dim, head_dim] if depth == 1 else [head_dim, hidden, head_dim]
        self.initial_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(heads, a, b) / math.sqrt(a)) for a, b in zip(dims, dims[1:])])

    @property
    def n_state(self) -> int:
        return 3 * self.depth + 1

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        shapes = [(batch, *w.shape) for w in self.initial_weights]
        return shapes * 3 + [(batch,)]

    def init_state(self, batch: int, device, dtype) -> State:
        ws = tuple(w.to(device=device, dtype=dtype).unsqueeze(0).expand(batch, -1, -1, -1)
                   for w in self.initial_weights)
        zeros = tuple(torch.zeros_like(w) for w in ws)
        return (*ws, *zeros, *ws, torch.zeros(batch, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        b, t, _ = x.shape
        h, dh, n = self.heads, self.head_dim, self.depth

        def heads_first(z):  # (B, T, H*dh) -> (B*H, T, dh)
            return z.view(b, t, h, dh).transpose(1, 2).reshape(b * h, t, dh)

        q = F.normalize(heads_first(self.to_q(x)), dim=-1)
        k = F.normalize(heads_first(self.to_k(x)), dim=-1)
        v = heads_first(self.to_v(x))
        gates = torch.sigmoid(self.to_gates(x)).view(b, t, 3, h).permute(2, 0, 3, 1)
        gates = gates.reshape(3, b * h, t)
        theta, eta, alpha = self.max_lr * gates[0], gates[1], gates[2]

        def groups(s):  # (B, H, ...) -> (B*H, ...)
            return s.reshape(b * h, *s.shape[2:])

        weights = tuple(groups(s) for s in state[:n])
        momentum = tuple(groups(s) for s in state[n:2 * n])
        base = tuple(groups(s) for s in state[2 * n:3 * n])
        phase = state[3 * n].repeat_interleave(h)
        lens = None if lengths is None else lengths.repeat_interleave(h)
        y, (W, S, Wb, p) = neural_memory_chunked(q, k, v, theta, eta, alpha, weights, momentum,
                                                 base, phase, self.chunk, lengths=lens)
        y = y.view(b, h, t, dh).transpose(1, 2).reshape(b, t, h * dh)

        def ungroup(s):
            return s.reshape(b, h, *s.shape[1:])

        new_state = (*map(ungroup, W), *map(ungroup, S), *map(ungroup, Wb), p.view(b, h)[:, 0])
        return y, new_state


class SlidingWindowAttention(nn.Module):
    """Multi-head sliding-window attention with persistent tokens (a building block)."""

    def __init__(self, d_in: int, heads: int, head_dim: int, window: int, persistent: int):
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        if not isinstance(persistent, int) or persistent < 0:
            raise ValueError(f"persistent must be an int >= 0, got {persistent!r}")
        self.heads, self.head_dim, self.window = heads, head_dim, window
        inner = heads * head_dim
        self.to_qkv = nn.Linear(d_in, 3 * inner, bias=False)
        self.persistent_k = nn.Parameter(torch.randn(persistent, heads, head_dim))
        self.persistent_v = nn.Parameter(torch.randn(persistent, heads, head_dim))

    def state_shapes(self, batch: int) -> list[tuple[int, ...]]:
        w, h, d = self.window - 1, self.heads, self.head_dim
        return [(batch, w, h, d), (batch, w, h, d), (batch, w)]

    def forward(self, x, state, lengths):
        b, t, _ = x.shape
        q, k, v = self.to_qkv(x).view(b, t, 3, self.heads, self.head_dim).unbind(2)
        y, cache = sliding_window_attention(q, k, v, self.window, *state, self.persistent_k,
                                            self.persistent_v, lengths=lengths)
        return y.reshape(b, t, -1), cache


class TitansLayer(RecurrentLayer):
    """Titans long-term memory (``variant="lmm"``) or its MAG / MAL blocks; see module docstring."""

    def __init__(self, d_model: int, variant: str = "lmm", heads: int = 1,
                 head_dim: int | None = None, memory_depth: int = 2,
                 memory_hidden: int | None = None, chunk: int = 16, max_lr: float = 0.1,
                 window: int = 64, persistent: int = 4):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        head_dim = d_model // heads if head_dim is None else head_dim
        if not isinstance(head_dim, int) or head_dim < 1:
            raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
        memory_hidden = 2 * head_dim if memory_hidden is None else memory_hidden
        self.input_size = self.output_size = d_model
        self.variant = variant
        inner = heads * head_dim
        self.memory = NeuralMemory(d_model, heads, head_dim, memory_depth, memory_hidden, chunk,
                                   max_lr)
        if variant == "mag":
            self.attention = SlidingWindowAttention(d_model, heads, head_dim, window, persistent)
        elif variant == "mal":
            self.to_mid = nn.Linear(inner, d_model, bias=False)
            self.attention = SlidingWindowAttention(d_model, heads, head_dim, window, persistent)
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        shapes = self.memory.state_shapes(batch_size)
        if self.variant != "lmm":
            shapes += self.attention.state_shapes(batch_size)
        return shapes

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ref = self.to_out.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        state = self.memory.init_state(batch_size, device, dtype)
        if self.variant != "lmm":
            state += tuple(torch.zeros(s, device=device, dtype=dtype)
                           for s in self.attention.state_shapes(batch_size))
        return state

    def _forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        n = self.memory.n_state
        mem_state, attn_state = state[:n], state[n:]
        if self.variant == "lmm":
            y, mem_state = self.memory(x, mem_state, lengths)
            out = self.to_out(y)
        elif self.variant == "mag":
            m, mem_state = self.memory(x, mem_state, lengths)
            a, attn_state = self.attention(x, attn_state, lengths)
            out = self.to_out(a * torch.sigmoid(m))
        else:  # mal
            m, mem_state = self.memory(x, mem_state, lengths)
            a, attn_state = self.attention(self.to_mid(m), attn_state, lengths)
            out = self.to_out(a)
        if lengths is not None:
            live = torch.arange(x.shape[1], device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
            out = torch.where(live.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype,
                                                                     device=out.device))
        return out, (*mem_state, *attn_state)


@register("titans", "Titans neural long-term memory (MLP memory, momentum, forgetting, chunked "
                    "test-time learning); variant='mag'/'mal' adds sliding-window attention")
def build_titans(d_model: int, **options) -> TitansLayer:
    return TitansLayer(d_model, **options)
