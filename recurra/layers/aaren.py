"""Aaren: attention as an RNN with a learned query (Feng et al., arXiv 2405.13956).

Per head, a learned, input-independent query ``q`` attends causally over keys and values made
from the input: ``o_t = softmax(q . k_{1..t} / sqrt(d_k)) v_{1..t}``, computed as the (m, u, w)
recurrence of ``recurra.ops.aaren`` (constant memory per step), in parallel by its chunked form.

State: ``(m, u, w)`` of shapes (B, H), (B, H), (B, H, d_model / H); the empty state is
(-inf, 0, 0).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.aaren import aaren_chunked, aaren_reference, empty_state
from .base import RecurrentLayer, time_mask
from .registry import register


class Aaren(RecurrentLayer):
    """Aaren token mixer.

    Args:
        d_model: input and output width.
        heads: number of heads (must divide d_model).
        key_dim: key size per head (default d_model / heads).
        chunk_size: chunk length of the parallel form.
    """

    def __init__(self, d_model: int, heads: int = 4, key_dim: int | None = None,
                 chunk_size: int = 64):
        super().__init__()
        if not isinstance(heads, int) or heads < 1 or d_model % heads:
            raise ValueError(f"heads must be a positive int dividing d_model={d_model}, "
                             f"got {heads!r}")
        key_dim = d_model // heads if key_dim is None else key_dim
        if not isinstance(key_dim, int) or key_dim < 1:
            raise ValueError(f"key_dim must be a positive int, got {key_dim!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.input_size = self.output_size = d_model
        self.heads, self.key_dim, self.value_dim = heads, key_dim, d_model // heads
        self.chunk_size = chunk_size
        self.query = nn.Parameter(torch.randn(heads, key_dim))
        self.k_proj = nn.Linear(d_model, heads * key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.out_proj = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.input_size}, heads={self.heads}, key_dim={self.key_dim}"

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.heads), (batch_size, self.heads),
                (batch_size, self.heads, self.value_dim)]

    def init_state(self, batch_size, device=None, dtype=None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ref = self.query
        return empty_state(batch_size, self.heads, self.value_dim,
                           ref.dtype if dtype is None else dtype,
                           ref.device if device is None else device)

    def _forward(self, x, state, lengths):
        b, t, _ = x.shape
        mask = None if lengths is None else time_mask(lengths, t)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype,
                                                                  device=x.device))
        k = self.k_proj(x).view(b, t, self.heads, self.key_dim)
        s = torch.einsum("bthd,hd->bht", k, self.query) / math.sqrt(self.key_dim)
        if mask is not None:  # a score of -inf changes nothing: padding never touches the state
            s = torch.where(mask.unsqueeze(1), s, torch.full((), float("-inf"), dtype=s.dtype,
                                                             device=s.device))
        v = self.v_proj(x).view(b, t, self.heads, self.value_dim).transpose(1, 2)
        if t == 1:
            o, state = aaren_reference(s, v, state)
        else:
            o, state = aaren_chunked(s, v, state, self.chunk_size)
        y = self.out_proj(o.transpose(1, 2).reshape(b, t, -1))
        if mask is not None:
            y = y * mask.unsqueeze(-1)
        return y, state


@register("aaren", "Aaren: attention as an RNN, a learned query per head over causal keys and "
                   "values; (m, u, w) prefix scan")
def build_aaren(d_model: int, **options) -> Aaren:
    return Aaren(d_model, **options)
