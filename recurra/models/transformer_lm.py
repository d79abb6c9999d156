"""A small, readable causal Transformer language model with a KV cache.

    tokens (B, T)
      -> token embedding (+ learned positions when positions="learned")     (B, T, d_model)
      -> n_layers x Block:
             x = x + Attention(RMSNorm(x))     (causal self-attention, RoPE by default, KV cache)
             x = x + MLP(RMSNorm(x))           (Linear -> GELU -> Linear)
      -> final RMSNorm                         (the "hidden" states)
      -> output head (tied to the embedding by default)                     (B, T, vocab_size)

``logits, cache = model(tokens, cache=None, position_ids=None, attention_mask=None)``

- ``cache`` is a tuple with one ``(k, v)`` pair per layer, each of shape (B, n_heads, S, head_dim)
  (batch first): the keys and values of the S tokens seen so far. Passing it back continues every
  sequence; the returned cache holds S + T tokens.
- ``position_ids`` (B, T) or (T,): the position of each new token (default ``S + arange(T)``).
  Draft-tree verification gives every node ``S + depth``.
- ``attention_mask`` bool (B or 1, T, S + T): True where new token i may attend to slot j
  (default: all of the cache plus the causal triangle). Draft trees pass the ancestor mask.

The cache helpers :func:`crop_cache`, :func:`compact_cache` and :func:`reorder_cache` keep the
first tokens, move an accepted draft path to contiguous slots, and select batch rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

KVCache = tuple  # tuple of (k, v) per layer, each (B, H, S, Dh)


@dataclass
class TransformerLMConfig:
    """Everything needed to rebuild a :class:`TransformerLM` (``TransformerLM(**asdict(c))``)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int = 4
    mlp_ratio: float = 4
    max_len: int = 4096
    dropout: float = 0.0
    tie_weights: bool = True
    positions: str = "rope"
    rope_base: float = 10000.0


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(d, h) -> GELU -> Linear(h, d)."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down(F.gelu(self.up(x))))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float) -> torch.Tensor:
    """Rotary position embedding of ``x`` (B, H, T, Dh) at integer ``positions`` (B, T)."""
    dh = x.shape[-1]
    inv_freq = base ** (-torch.arange(0, dh, 2, device=x.device, dtype=torch.float64) / dh)
    angles = positions.to(torch.float64).unsqueeze(-1) * inv_freq  # (B, T, Dh/2)
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)      # (B, 1, T, Dh)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Multi-head causal self-attention that appends to a (k, v) cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float, rope: bool, rope_base: float):
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.dropout = dropout
        self.rope = rope
        self.rope_base = rope_base

    def forward(self, x, positions, mask, layer_cache):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rope:
            q = apply_rope(q, positions, self.rope_base)
            k = apply_rope(k, positions, self.rope_base)
        if layer_cache is not None:
            k = torch.cat((layer_cache[0], k), dim=2)
            v = torch.cat((layer_cache[1], v), dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.unsqueeze(1) if mask is not None else None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d)), (k, v)


class Block(nn.Module):
    def __init__(self, config: TransformerLMConfig):
        super().__init__()
        d = config.d_model
        self.norm_attn = nn.RMSNorm(d, eps=1e-6)
        self.attn = Attention(d, config.n_heads, config.dropout, config.positions == "rope",
                              config.rope_base)
        self.norm_mlp = nn.RMSNorm(d, eps=1e-6)
        self.mlp = MLP(d, round(config.mlp_ratio * d), config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, positions, mask, layer_cache):
        y, layer_cache = self.attn(self.norm_attn(x), positions, mask, layer_cache)
        x = x + self.dropout(y)
        return x + self.mlp(self.norm_mlp(x)), layer_cache


class TransformerLM(nn.Module):
    """Pre-norm causal Transformer LM with RoPE (or learned positions) and a KV cache."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int = 4,
                 mlp_ratio: float = 4, max_len: int = 4096, dropout: float = 0.0,
                 tie_weights: bool = True, positions: str = "rope", rope_base: float = 10000.0):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers), ("n_heads", n_heads), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if d_model % n_heads or (d_model // n_heads) % 2:
            raise ValueError(f"d_model ({d_model}) must be n_heads ({n_heads}) x an even head size")
        if positions not in ("rope", "learned"):
            raise ValueError(f"positions must be 'rope' or 'learned', got {positions!r}")
        if not isinstance(mlp_ratio, (int, float)) or mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be a number > 0, got {mlp_ratio!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.config = TransformerLMConfig(vocab_size, d_model, n_layers, n_heads, mlp_ratio,
                                          max_len, dropout, tie_weights, positions, rope_base)
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position_embedding = (nn.Embedding(max_len, d_model) if positions == "learned"
                                   else None)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(self.config) for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_weights:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        """GPT-2 style: N(0, 0.02), residual projections scaled down with depth."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        for block in self.blocks:
            std = 0.02 / math.sqrt(2 * len(self.blocks))
            nn.init.normal_(block.attn.out.weight, std=std)
            nn.init.normal_(block.mlp.down.weight, std=std)

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False,
                logits_to_keep: int = 0):
        """``tokens`` (B, T) -> ``logits`` (B, T, vocab_size), ``cache`` (see module docstring).

        ``logits_to_keep=n`` > 0 computes the logits of the last n positions only (prefill).
        With ``return_hidden=True`` also returns the final-norm hidden states (B, T, d_model).
        """
        past, position_ids, mask = check_decoder_inputs(
            tokens, lambda batch: self.check_cache(cache, batch), position_ids, attention_mask,
            self.config.vocab_size, self.config.max_len)
        x = self.embedding(tokens)
        if self.position_embedding is not None:
            x = x + self.position_embedding(position_ids)
        x = self.dropout(x)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, position_ids, mask, cache[i] if cache else None)
            new_cache.append(layer_cache)
        hidden = self.norm(x)
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        if return_hidden:
            return logits, tuple(new_cache), hidden
        return logits, tuple(new_cache)

    def check_cache(self, cache: KVCache | None, batch: int) -> int:
        """Validate a cache for ``batch`` rows; returns its length S (0 for None)."""
        return check_kv_cache(cache, len(self.blocks), batch, self.config.n_heads,
                              self.config.d_model // self.config.n_heads)

    def config_dict(self) -> dict:
        """A JSON-ready config that :func:`recurra.models.build_model` turns back into this model."""
        return {"architecture": "transformer", **asdict(self.config)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_kv_cache(cache: KVCache | None, n_layers: int, batch: int, heads: int,
                   head_dim: int) -> int:
    """Validate a cache of ``n_layers`` (k, v) pairs for ``batch`` rows, each
    (batch, heads, S, head_dim); returns S (0 for None or an empty cache)."""
    if cache is None or len(cache) == 0:
        return 0
    if not isinstance(cache, (tuple, list)) or len(cache) != n_layers:
        raise ValueError(f"cache must be a tuple of {n_layers} (k, v) pairs, one per "
                         f"layer, got {type(cache).__name__} of length {len(cache)}")
    k = cache[0][0]
    if k.dim() != 4 or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        raise ValueError(f"cache tensors must have shape ({batch}, {heads}, S, {head_dim}), "
                         f"got {tuple(k.shape)}")
    return k.shape[2]


def check_decoder_inputs(tokens: torch.Tensor, cache_length, position_ids, attention_mask,
                         vocab_size: int, max_len: int):
    """Validate a KV-cache decoder's inputs; returns ``(past, position_ids (B, T), mask)``.

    ``cache_length(batch)`` validates the cache for the tokens' batch and returns its length
    ``past`` (the model's ``check_cache``). ``mask`` is the bool (B or 1, T, past + T) attention
    mask: the one given, else the cache plus the causal triangle, or None for a single new token
    (it sees the whole cache).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be a tensor of shape (batch, time), got {got}")
    if tokens.dtype not in (torch.long, torch.int32):
        raise ValueError(f"tokens must hold integers (torch.long), got {tokens.dtype}")
    batch, steps = tokens.shape
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"tokens must lie in [0, {vocab_size - 1}], got values "
                         f"in [{int(tokens.min())}, {int(tokens.max())}]")
    past = cache_length(batch)
    if position_ids is None:
        position_ids = torch.arange(past, past + steps, device=tokens.device)
    position_ids = torch.as_tensor(position_ids, device=tokens.device)
    if position_ids.dim() == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.shape[-1] != steps or position_ids.shape[0] not in (1, batch):
        raise ValueError(f"position_ids must have shape ({batch}, {steps}) or ({steps},), "
                         f"got {tuple(position_ids.shape)}")
    position_ids = position_ids.expand(batch, steps)
    if steps and int(position_ids.max()) >= max_len:
        raise ValueError(f"positions must be < max_len={max_len}, got {int(position_ids.max())}")
    if attention_mask is None:
        mask = None if steps <= 1 else torch.ones(
            1, steps, past + steps, dtype=torch.bool, device=tokens.device).tril(past)
    else:
        mask = attention_mask
        if (mask.dtype != torch.bool or mask.dim() != 3 or mask.shape[0] not in (1, batch)
                or tuple(mask.shape[1:]) != (steps, past + steps)):
            raise ValueError(
                f"attention_mask must be a bool tensor of shape ({batch} or 1, {steps}, "
                f"{past + steps}) (new tokens x cached+new slots), got "
                f"{mask.dtype} {tuple(mask.shape)}")
    return past, position_ids, mask


# --------------------------------------------------------------------- cache helpers
def cache_length(cache: KVCache | None) -> int:
    return 0 if not cache else cache[0][0].shape[2]


def crop_cache(cache: KVCache, length: int) -> KVCache:
    """Keep the first ``length`` tokens of every layer's cache (the cache itself when it holds
    exactly that many: a plain decoding step's commit costs nothing)."""
    if not cache or cache[0][0].shape[2] == length:
        return cache
    return tuple((k[:, :, :length], v[:, :, :length]) for k, v in cache)


def compact_cache(cache: KVCache, start: int, keep: torch.Tensor | list[int]) -> KVCache:
    """Keep slots ``[:start]`` followed by slots ``start + keep[j]`` (an accepted draft path)."""
    keep = torch.as_tensor(keep, dtype=torch.long)
    index = start + keep.to(cache[0][0].device) if len(cache) else keep
    return tuple((torch.cat((k[:, :, :start], k.index_select(2, index)), dim=2),
                  torch.cat((v[:, :, :start], v.index_select(2, index)), dim=2))
                 for k, v in cache)


def reorder_cache(cache: KVCache, index: torch.Tensor) -> KVCache:
    """Select (and repeat) batch rows: row i of the result is row ``index[i]``."""
    return tuple((_select_rows(k, index), _select_rows(v, index)) for k, v in cache)


def _select_rows(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.index_select(0, index)`` in ``t``'s memory layout: keys that LlamaLM's compiled
    forward stores with the slots innermost stay so (beam search reorders every step)."""
    if t.dim() == 4 and t.stride(2) == 1 and t.shape[3] > 1:
        return t.transpose(2, 3).index_select(0, index).transpose(2, 3)
    return t.index_select(0, index)


__all__ = [
    "TransformerLM",
    "TransformerLMConfig",
    "apply_rope",
    "cache_length",
    "check_decoder_inputs",
    "check_kv_cache",
    "compact_cache",
    "crop_cache",
    "reorder_cache",
]
