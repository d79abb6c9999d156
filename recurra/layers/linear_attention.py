"""Causal linear attention with a feature map (identity, elu+1, or the Taylor map of Based).

``y_t = phi(q_t)^T S_t / phi(q_t)^T z_t`` with ``S_t = sum_{j<=t} phi(k_j) v_j^T`` and
``z_t = sum_{j<=t} phi(k_j)`` per head (see ``recurra.ops.linear_attention``). The state is
``(S, z)`` when normalised, ``(S,)`` otherwise: constant in the sequence length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import chunked_scan_compiled
from ..ops.linear_attention import (
    FEATURE_MAPS,
    feature_dim,
    feature_map,
    linear_attention_chunked,
    linear_attention_reference,
)
from .base import RecurrentLayer, State, run_in_blocks, time_mask
from .registry import register


class LinearAttention(RecurrentLayer):
    """Multi-head causal linear attention.

    Args:
        d_model: input and output width.
        heads: number of heads; ``d_model`` must be divisible by it (value size d_model / heads).
        feature_map: ``"identity"``, ``"elu"`` (elu + 1) or ``"taylor"`` (Based).
        key_dim: query/key size per head before the feature map (default: d_model / heads, or 16
            for the Taylor map, whose feature size is 1 + key_dim + key_dim^2).
        normalize: divide by ``phi(q)^T z`` (default True, except for the identity map whose
            scores can be negative; unnormalised queries are scaled by key_dim^-1/2).
        chunk_size: chunk length of the parallel form.
        eps: added to the normaliser.
        backend: ``"auto"`` (default) runs inference calls (no gradient needed, CPU, float32 or
            float64; identity and elu feature maps) through the compiled chunked scan
            (``recurra.ops.chunked_scan_compiled``: one pass, the feature map applied as keys and
            queries are read, the heads read in place from one fused projection) and everything
            else through the torch ops; ``"torch"`` always runs the torch ops.
    """

    def __init__(self, d_model: int, heads: int = 4, feature_map: str = "elu",
                 key_dim: int | None = None, normalize: bool | None = None,
                 chunk_size: int = 64, eps: float = 1e-6, backend: str = "auto"):
        super().__init__()
        self.backend = chunked_scan_compiled.check_backend(backend)
        if feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
        if not isinstance(heads, int) or heads < 1 or d_model % heads:
            raise ValueError(f"heads must be a positive int dividing d_model={d_model}, "
                             f"got {heads!r}")
        if key_dim is None:
            key_dim = 16 if feature_map == "taylor" else d_model // heads
        if not isinstance(key_dim, int) or key_dim < 1:
            raise ValueError(f"key_dim must be a positive int, got {key_dim!r}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.input_size = self.output_size = d_model
        self.heads = heads
        self.kind = feature_map
        self.key_dim = key_dim
        self.value_dim = d_model // heads
        self.features = feature_dim(feature_map, key_dim)
        self.normalize = (feature_map != "identity") if normalize is None else bool(normalize)
        self.chunk_size = chunk_size
        self.eps = eps
        self.q_proj = nn.Linear(d_model, heads * key_dim, bias=False)
        self.k_proj = nn.Linear(d_model, heads * key_dim, bias=False)
        self.v_proj = nn.Linear(d_model, heads * self.value_dim, bias=False)
        self.out_proj = nn.Linear(heads * self.value_dim, d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.input_size}, heads={self.heads}, feature_map={self.kind!r}, "
                f"key_dim={self.key_dim}, normalize={self.normalize}")

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        shapes = [(batch_size, self.heads, self.features, self.value_dim)]
        if self.normalize:
            shapes.append((batch_size, self.heads, self.features))
        return shapes

    # ----------------------------------------------------------------- helpers for subclasses
    def _split_heads(self, y: torch.Tensor) -> torch.Tensor:
        b, t, _ = y.shape
        return y.view(b, t, self.heads, -1).transpose(1, 2)

    def _features(self, raw: torch.Tensor) -> torch.Tensor:
        return feature_map(self._split_heads(raw), self.kind)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        q = self._features(self.q_proj(x))
        if not self.normalize:
            q = q * self.key_dim ** -0.5
        return q

    def _attend(self, q, k, v, state: State) -> tuple[torch.Tensor, State]:
        if q.shape[2] == 1:  # one step: the recurrence itself
            return linear_attention_reference(q, k, v, state, self.normalize, self.eps)
        return linear_attention_chunked(q, k, v, state, self.normalize, self.eps,
                                        self.chunk_size)

    def _merge(self, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, _, t, _ = y.shape
        y = self.out_proj(y.transpose(1, 2).reshape(b, t, -1))
        return y if mask is None else y * mask

    # ----------------------------------------------------------------- contract
    #: tokens per block of a long input (rounded down to whole chunks): the state is carried from
    #: block to block (the same function, see ``run_in_blocks``) and each block's temporaries
    #: stay small (an isolated A/B at (4, 4096, 256): about 100 ms against 167 in one pass)
    block_tokens = 512

    def _forward(self, x, state, lengths):
        return run_in_blocks(self._forward_block, x, state, lengths, self.block_tokens,
                             multiple=self.chunk_size)

    def _forward_block(self, x, state, lengths):
        mask = None if lengths is None else time_mask(lengths, x.shape[1]).unsqueeze(-1)
        if mask is not None:
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        if (self.kind in ("identity", "elu") and x.shape[1] > 1
                and chunked_scan_compiled.serves(self.backend, x, self.q_proj.weight, *state)):
            return self._forward_compiled(x, state, mask)
        q = self._queries(x)
        k = self._features(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        if mask is not None:  # padded steps add nothing to the memory
            m = mask.transpose(1, 2).unsqueeze(-1).to(x.dtype)  # (B, 1, T, 1)
            k, v = k * m, v * m
        y, state = self._attend(q, k, v, state)
        return self._merge(y, mask), state

    def _forward_compiled(self, x, state, mask):
        """The inference path: one projection for q, k, v, read per head in place by the
        compiled scan, and its output merged for free."""
        hk, hv = self.heads * self.key_dim, self.heads * self.value_dim
        qkv = F.linear(x, torch.cat([self.q_proj.weight, self.k_proj.weight,
                                     self.v_proj.weight]))
        q, k, v = (self._split_heads(part) for part in qkv.split([hk, hk, hv], -1))
        # the kernel applies elu + 1 as it reads (not when padding must zero phi(k), nor when
        # the unnormalised queries are scaled after the map)
        fused_map = mask is None and self.kind == "elu" and self.normalize
        if not fused_map:
            q, k = feature_map(q, self.kind), feature_map(k, self.kind)
        if mask is not None:  # padded steps add nothing to the memory
            m = mask.transpose(1, 2).unsqueeze(-1).to(x.dtype)  # (B, 1, T, 1)
            k, v = k * m, v * m
        if not self.normalize:
            q = q * self.key_dim ** -0.5
        y, state = chunked_scan_compiled.linear_attention_forward(
            q, k, v, state, self.normalize, self.eps, self.chunk_size, fused_map)
        return self._merge(y, mask), state


@register("linear_attention",
          "causal multi-head linear attention; feature maps identity, elu+1, taylor (Based)")
def build_linear_attention(d_model: int, **options) -> LinearAttention:
    return LinearAttention(d_model, **options)
