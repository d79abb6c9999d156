"""Titans (Behrouz et al., arXiv 2501.00663): neural long-term memory, and the MAG / MAL blocks.

``variant``:
- ``"lmm"``: the long-term memory alone. Per head: q = l2norm(W_Q x), k = l2norm(W_K x), v = W_V x,
  theta = max_lr * sigmoid(.), eta = sigmoid(.), alpha = sigmoid(.) (linear maps of x); the MLP
  memory learns k -> v at test time (see :mod:`recurra.ops.titans_memory`) and y = W_O M_t(q_t).
- ``"mag"`` (memory as a gate): y = W_O( SWA(x) * sigmoid(LMM(x)) ), where SWA is sliding-window
  attention of width ``window`` with ``persistent`` learned key/value tokens always visible.
- ``"mal"`` (memory as a layer): y = W_O SWA( W_M LMM(x) ).
- ``"mac"`` (memory as context), causal form: the sequence is cut into segments of ``chunk``
  tokens (the memory's re-basing interval). For token t of a segment, h_t = M_{W'}(q^h_t) is read
  from the memory as it was at the segment's start (W'); attention of t covers the persistent
  tokens and, for every earlier-or-same token j of the segment, two tokens: h_j and x_j;
  its output a_t is written into the memory (the LMM on W_M a), and y = W_O(a * sigmoid(LMM)).

State (batch first): the memory weights, momentum, base weights (one tensor (B, H, ., .) per MLP
matrix each), the chunk phase (B,) and, for MAG/MAL, the attention cache: keys, values
(B, window - 1, H, head_dim) and their 0/1 valid flags (B, window - 1). Everything is constant in
the sequence length, so ``step`` runs in constant memory. MAC's cache holds the keys and values
of the current segment's tokens (B, chunk - 1, 2, H, head_dim) each; which of them belong to the
segment follows from the phase.

Simplifications against the paper (documented in docs/layers-zoo-b.md): no short depthwise conv on
q/k/v; gates per token (not per chunk); persistent tokens enter the attention only (not the memory);
MAC attends causally inside its segment (token t sees h_j and x_j for j <= t only).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sliding_window_attention import sliding_window_attention
from ..ops.titans_memory import memory_apply, neural_memory_chunked, phase_as_long
from .base import RecurrentLayer, State
from .registry import register

VARIANTS = ("lmm", "mag", "mal", "mac")


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
            self.to_gates.bias.view(3, heads)[2].fill_(-6.0)  # half-life ~ 280 tokens
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
        elif variant == "mac":
            self.to_hq = nn.Linear(d_model, inner, bias=False)  # memory query for h
            self.to_xqkv = nn.Linear(d_model, 3 * inner, bias=False)  # token query, key, value
            self.to_hkv = nn.Linear(inner, 2 * inner, bias=False)  # key, value of the h tokens
            self.to_mid = nn.Linear(inner, d_model, bias=False)
            if not isinstance(persistent, int) or persistent < 0:
                raise ValueError(f"persistent must be an int >= 0, got {persistent!r}")
            self.persistent_k = nn.Parameter(torch.randn(persistent, heads, head_dim))
            self.persistent_v = nn.Parameter(torch.randn(persistent, heads, head_dim))
        self.to_out = nn.Linear(inner, d_model, bias=False)

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        shapes = self.memory.state_shapes(batch_size)
        if self.variant == "mac":
            cache = (batch_size, self.memory.chunk - 1, 2, self.memory.heads, self.memory.head_dim)
            shapes += [cache, cache]
        elif self.variant != "lmm":
            shapes += self.attention.state_shapes(batch_size)
        return shapes

    def init_state(self, batch_size, device=None, dtype=None) -> State:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ref = self.to_out.weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        state = self.memory.init_state(batch_size, device, dtype)
        n = self.memory.n_state
        state += tuple(torch.zeros(s, device=device, dtype=dtype)
                       for s in self.state_shapes(batch_size)[n:])
        return state

    def _forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        n = self.memory.n_state
        mem_state, attn_state = state[:n], state[n:]
        if self.variant == "mac":
            return self._forward_mac(x, mem_state, attn_state, lengths)
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


    def _forward_mac(self, x, mem_state, cache, lengths):
        b, t, _ = x.shape
        mem = self.memory
        C, h, dh, n_mem = mem.chunk, mem.heads, mem.head_dim, mem.depth
        dev, dt = x.device, x.dtype
        zero = torch.zeros((), dtype=dt, device=dev)
        p = phase_as_long(mem_state[-1], C)
        n = torch.full((b,), t, device=dev, dtype=torch.long) if lengths is None else lengths
        xq, xk, xv = self.to_xqkv(x).view(b, t, 3, h, dh).unbind(2)
        hq = F.normalize(self.to_hq(x).view(b, t, h, dh), dim=-1)
        cache_k, cache_v = cache
        r = torch.arange(C, device=dev)
        causal = r.view(C, 1) >= r.view(1, C)  # slot j visible to slot i when j <= i
        eye = torch.zeros(1, 1, C, C, 2, dtype=torch.bool, device=dev)
        eye[..., 1] = torch.eye(C, dtype=torch.bool, device=dev)
        scale = 1.0 / math.sqrt(dh)
        n_seg = -(-(t + int(p.max())) // C)
        outs, keys, vals = [], [], []
        for c in range(n_seg):
            tok = (c * C - p).unsqueeze(1) + r  # (B, C): token of each slot of this segment
            real = (tok >= 0) & (tok < n.unsqueeze(1))
            cached = tok < 0  # earlier tokens of the current segment: in the cache
            idx = tok.clamp(0, t - 1)

            def take(z):  # (B, T, ...) -> (B, C, ...) at the slots' tokens
                ix = idx.view(b, C, *([1] * (z.dim() - 2))).expand(b, C, *z.shape[2:])
                return z.gather(1, ix)

            # h: read of the memory as it was at the start of the segment
            W, Wb, ph = mem_state[:n_mem], mem_state[2 * n_mem:3 * n_mem], mem_state[-1]
            start = tuple(torch.where((ph == 0).view(b, 1, 1, 1), w, wb) for w, wb in zip(W, Wb))
            hvec = memory_apply(start, take(hq).transpose(1, 2)).transpose(1, 2)  # (B, C, H, dh)
            hk, hv = self.to_hkv(hvec.reshape(b, C, h * dh)).view(b, C, 2, h, dh).unbind(2)
            k_new = torch.stack([hk, take(xk)], 2)  # (B, C, 2, H, dh)
            v_new = torch.stack([hv, take(xv)], 2)
            cidx = (C - 1 + tok).clamp(0, C - 2) if C > 1 else torch.zeros_like(tok)

            def from_cache(z):
                if C == 1:
                    return torch.zeros_like(k_new)
                ix = cidx.view(b, C, 1, 1, 1).expand(b, C, *z.shape[2:])
                return z.gather(1, ix)

            sel = cached.view(b, C, 1, 1, 1)
            k_slot = torch.where(sel, from_cache(cache_k), torch.where(real.view(b, C, 1, 1, 1),
                                                                       k_new, zero))
            v_slot = torch.where(sel, from_cache(cache_v), torch.where(real.view(b, C, 1, 1, 1),
                                                                       v_new, zero))
            keys.append(k_new)
            vals.append(v_new)
            valid = (real | cached).view(b, 1, 1, C, 1) & causal.view(1, 1, C, C, 1)
            valid = valid | eye  # every slot sees its own x token: no empty softmax anywhere
            q_slot = take(xq)
            s = torch.einsum("bihd,bjshd->bhijs", q_slot, k_slot) * scale  # (B, H, C, C, 2)
            s = s.masked_fill(~valid, float("-inf")).reshape(b, h, C, 2 * C)
            sp = torch.einsum("bihd,phd->bhip", q_slot, self.persistent_k) * scale
            probs = torch.softmax(torch.cat([sp, s], -1), -1)
            npers = self.persistent_k.shape[0]
            a = (torch.einsum("bhip,phd->bihd", probs[..., :npers], self.persistent_v)
                 + torch.einsum("bhij,bjhd->bihd", probs[..., npers:],
                                v_slot.reshape(b, 2 * C, h, dh)))
            a = a.reshape(b, C, h * dh)
            # write the segment's outputs into the memory (left-aligned per row)
            first = torch.where(tok[:, :1] < 0, -tok[:, :1], torch.zeros_like(tok[:, :1]))  # (B,1)
            count = (real.sum(1)).long()
            lidx = (first + r).clamp(max=C - 1)
            a_left = a.gather(1, lidx.unsqueeze(-1).expand(b, C, a.shape[-1]))
            m_left, mem_state = mem(self.to_mid(a_left), mem_state, count)
            back = (r.unsqueeze(0) - first).clamp(min=0)
            m = m_left.gather(1, back.unsqueeze(-1).expand(b, C, m_left.shape[-1]))
            o = self.to_out(a * torch.sigmoid(m))
            outs.append(torch.where(real.unsqueeze(-1), o, zero))
        # slots -> tokens: token t of row b sits in slot t + p_b of the concatenated segments
        pos = (torch.arange(t, device=dev).unsqueeze(0) + p.unsqueeze(1))  # (B, T)

        def to_tokens(parts):
            z = torch.cat(parts, 1)
            ix = pos.view(b, t, *([1] * (z.dim() - 2))).expand(b, t, *z.shape[2:])
            return z.gather(1, ix)

        out = to_tokens(outs)
        # new cache: the last chunk - 1 tokens before each row's length (older ones are masked by
        # the phase when read)
        if C > 1:
            ks = torch.cat([cache_k, to_tokens(keys)], 1)
            vs = torch.cat([cache_v, to_tokens(vals)], 1)
            ix = (n.unsqueeze(1) + torch.arange(C - 1, device=dev)).view(b, C - 1, 1, 1, 1)
            cache_k = ks.gather(1, ix.expand(b, C - 1, *ks.shape[2:]))
            cache_v = vs.gather(1, ix.expand(b, C - 1, *vs.shape[2:]))
        if lengths is not None:
            live = torch.arange(t, device=dev).unsqueeze(0) < lengths.unsqueeze(1)
            out = torch.where(live.unsqueeze(-1), out, zero)
        return out, (*mem_state, cache_k, cache_v)


@register("titans", "Titans neural long-term memory (MLP memory, momentum, forgetting, chunked "
                    "test-time learning); variant='mag'/'mal' add sliding-window attention, 'mac' "
                    "segment attention over memory reads")
def build_titans(d_model: int, **options) -> TitansLayer:
    return TitansLayer(d_model, **options)
