"""The Llama architecture (Llama 2/3, SmolLM2, TinyLlama, ...) with our KV-cache contract.

    tokens (B, T)
      -> token embedding                                                    (B, T, d_model)
      -> n_layers x LlamaBlock:
             x = x + Attention(RMSNorm(x))   (grouped-query attention, RoPE, KV cache)
             x = x + MLP(RMSNorm(x))         (down(silu(gate(x)) * up(x)))
      -> final RMSNorm                       (the "hidden" states)
      -> output head (tied to the embedding when the checkpoint ties them)  (B, T, vocab_size)

``logits, cache = model(tokens, cache=None, position_ids=None, attention_mask=None)``, exactly
as :class:`~recurra.models.transformer_lm.TransformerLM`: the cache is a tuple of ``(k, v)`` per
layer, each (B, n_kv_heads, S, head_dim), so the decoding engine's KV-cache adapter (draft
trees, crop, compact, beam reorder) serves both.

:meth:`LlamaLM.from_transformers` ports a transformers ``LlamaForCausalLM``: the same numbers
(float64: to 1e-10; float32: to rounding) from a forward pass that does less. Why it is faster
on a CPU, for decoding:

- one GEMM for q, k and v and one for gate and up, instead of five;
- every weight is stored input-major (``y = x @ W``), the layout in which MKL's GEMM does best
  at the few rows of a decoding step or a draft tree (on the 2-core CPU, 4 rows through the
  576 x 49152 output head of SmolLM2: 2.8 ms against 4.4 in torch.nn.Linear's layout; 8 and 16
  rows: about the same in both);
- the rotary tables are computed once, not at every call, and there is no per-call
  configuration and mask machinery;
- with ``backend="auto"`` (the default), inference calls of at most 128 rows (batch x tokens:
  a decoding step, a draft tree, a few beams, a short prefill) run the whole forward in one
  compiled call
  (:mod:`recurra.ops.llama_decode`): no per-op dispatch, the products streamed from packed
  weights (8 rows cost 1.05-1.2x one row instead of MKL's 1.7-2.3x), and every row computed
  independently of the others, so a token's logits are bitwise the same decoded alone or
  verified inside a draft tree. ``"torch"`` runs the torch forward below (the reference)
  everywhere; training calls always do.

The port copies the weights (it does not share them with the transformers model). A tied output
head reads the embedding; without gradients, from a transposed copy (the fast layout) that is
rebuilt whenever the embedding changes, so the port can also be trained or fine-tuned.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import llama_decode
from .transformer_lm import KVCache, check_decoder_inputs, check_kv_cache, rotate_half


@dataclass
class LlamaConfig:
    """Everything needed to rebuild a :class:`LlamaLM` (``LlamaLM(**asdict(c))``)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_len: int = 4096
    tie_weights: bool = True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` (the order of operations of transformers' Llama)."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_tables(head_dim: int, max_len: int, theta: float, dtype=torch.float32):
    """cos and sin (max_len, head_dim) of the rotary embedding at positions 0..max_len-1."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = torch.arange(max_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


class LlamaBlock(nn.Module):
    """One pre-norm decoder layer. Weights are input-major: ``qkv`` (d, (H + 2 Hkv) Dh),
    ``out`` (H Dh, d), ``gate_up`` (d, 2 I) (gate then up), ``down`` (I, d)."""

    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.eps = c.rms_norm_eps
        qkv = (c.n_heads + 2 * c.n_kv_heads) * c.head_dim
        self.norm_attn = nn.Parameter(torch.ones(c.d_model))
        self.qkv = nn.Parameter(torch.empty(c.d_model, qkv))
        self.out = nn.Parameter(torch.empty(c.n_heads * c.head_dim, c.d_model))
        self.norm_mlp = nn.Parameter(torch.ones(c.d_model))
        self.gate_up = nn.Parameter(torch.empty(c.d_model, 2 * c.intermediate_size))
        self.down = nn.Parameter(torch.empty(c.intermediate_size, c.d_model))
        for w in (self.qkv, self.out, self.gate_up, self.down):
            nn.init.normal_(w, std=0.02)

    def forward(self, x, cos, sin, mask, layer_cache):
        b, t, _ = x.shape
        h, hkv, dh = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = rms_norm(x, self.norm_attn, self.eps) @ self.qkv
        q, k, v = qkv.split((h * dh, hkv * dh, hkv * dh), dim=-1)
        q = q.view(b, t, h, dh).transpose(1, 2)
        k = k.view(b, t, hkv, dh).transpose(1, 2)
        v = v.view(b, t, hkv, dh).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if layer_cache is not None:
            k = torch.cat((layer_cache[0], k), dim=2)
            v = torch.cat((layer_cache[1], v), dim=2)
        causal = mask is None and t > 1  # a prefill from an empty cache
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask is None else mask.unsqueeze(1), is_causal=causal,
            scale=1.0 / math.sqrt(dh), enable_gqa=hkv != h)
        x = x + y.transpose(1, 2).reshape(b, t, h * dh) @ self.out
        gate, up = (rms_norm(x, self.norm_mlp, self.eps) @ self.gate_up).chunk(2, dim=-1)
        return x + (F.silu(gate) * up) @ self.down, (k, v)


class LlamaLM(nn.Module):
    """A Llama-architecture causal LM with our KV-cache forward (see the module docstring)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
                 n_kv_heads: int, head_dim: int, intermediate_size: int,
                 rms_norm_eps: float = 1e-5, rope_theta: float = 10000.0, max_len: int = 4096,
                 tie_weights: bool = True):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers), ("n_heads", n_heads),
                            ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                            ("intermediate_size", intermediate_size), ("max_len", max_len)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads})")
        if head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary pairs), got {head_dim}")
        self.config = LlamaConfig(vocab_size, d_model, n_layers, n_heads, n_kv_heads, head_dim,
                                  intermediate_size, rms_norm_eps, rope_theta, max_len,
                                  tie_weights)
        self.embedding = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.blocks = nn.ModuleList(LlamaBlock(self.config) for _ in range(n_layers))
        self.norm = nn.Parameter(torch.ones(d_model))
        # the output head, input-major (d_model, vocab). A tied head is the embedding: without
        # gradients it is read from a transposed copy, rebuilt whenever the embedding changes
        self.head = (None if tie_weights
                     else nn.Parameter(torch.empty(d_model, vocab_size).normal_(std=0.02)))
        self._tied_copy: tuple | None = None
        self._backend = "auto"
        self._packed: tuple | None = None
        cos, sin = rope_tables(head_dim, max_len, rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def backend(self) -> str:
        """``"auto"`` (default) or ``"torch"``: whether inference calls of a few tokens run the
        compiled forward (module docstring)."""
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in ("auto", "torch"):
            raise ValueError(f"backend must be 'auto' or 'torch', got {value!r}")
        self._backend = value

    def output_head(self) -> torch.Tensor:
        """The (d_model, vocab) output matrix. Tied: the embedding's transpose, a view when
        gradients are on, else a contiguous copy (the fast GEMM layout) kept until the
        embedding's data changes (its tensor version or storage)."""
        if self.head is not None:
            return self.head
        w = self.embedding.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return w.t()
        key = (w._version, w.data_ptr(), w.dtype, w.device)
        if self._tied_copy is None or self._tied_copy[0] != key:
            self._tied_copy = (key, w.detach().t().contiguous())
        return self._tied_copy[1]

    _WEIGHT_NAMES = ("norm_attn", "qkv", "out", "norm_mlp", "gate_up", "down")

    def _compiled_weights(self) -> llama_decode.PackedLlama:
        """The compiled forward's weights (packed copies), kept while every weight's version
        and storage are unchanged (checked per call: tens of microseconds, where gathering and
        looking up the packed weights one by one took about a millisecond)."""
        tensors = [b._parameters[n] for b in self.blocks for n in self._WEIGHT_NAMES]
        tensors += [self.norm, self.embedding.weight if self.head is None else self.head]
        key = tuple((t._version, t.data_ptr()) for t in tensors)
        if self._packed is None or self._packed[0] != key:
            layers = [tensors[6 * i:6 * i + 6] for i in range(len(self.blocks))]
            self._packed = (key, llama_decode.pack_weights(layers, self.norm,
                                                           self.output_head()))
        return self._packed[1]

    def _apply(self, fn, recurse=True):  # .double() / .to(): the rotary tables follow, exactly
        super()._apply(fn, recurse)
        cos, sin = rope_tables(self.config.head_dim, self.config.max_len, self.config.rope_theta,
                               self.embedding.weight.dtype)
        self.rope_cos = cos.to(self.embedding.weight.device)
        self.rope_sin = sin.to(self.embedding.weight.device)
        return self

    # ----------------------------------------------------------------- forward
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None,
                position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, return_hidden: bool = False,
                logits_to_keep: int = 0):
        """``tokens`` (B, T) -> ``logits`` (B, T, vocab_size), ``cache``; the arguments are
        :meth:`TransformerLM.forward`'s."""
        past, position_ids, mask = check_decoder_inputs(
            tokens, lambda batch: self.check_cache(cache, batch), position_ids, attention_mask,
            self.config.vocab_size, self.config.max_len)
        if mask is not None and past == 0 and attention_mask is None:
            mask = None  # a prefill: SDPA's causal kernel
        x = self.embedding(tokens)
        if (self._backend == "auto" and not (torch.is_grad_enabled()
                                             and any(p.requires_grad for p in self.parameters()))
                and llama_decode.serves(x, self.norm)):
            return llama_decode.llama_decode(  # no attention_mask: causal (mask None)
                x, self.rope_cos[position_ids], self.rope_sin[position_ids],
                None if attention_mask is None else mask,
                cache or (), self._compiled_weights(), self.config.n_heads,
                self.config.n_kv_heads, self.config.rms_norm_eps, logits_to_keep, return_hidden)
        cos = self.rope_cos[position_ids].unsqueeze(1)            # (B, 1, T, Dh)
        sin = self.rope_sin[position_ids].unsqueeze(1)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x, layer_cache = block(x, cos, sin, mask, cache[i] if cache else None)
            new_cache.append(layer_cache)
        hidden = rms_norm(x, self.norm, self.config.rms_norm_eps)
        logits = (hidden[:, -logits_to_keep:] if logits_to_keep else hidden) @ self.output_head()
        if return_hidden:
            return logits, tuple(new_cache), hidden
        return logits, tuple(new_cache)

    def check_cache(self, cache: KVCache | None, batch: int) -> int:
        """Validate a cache for ``batch`` rows; returns its length S (0 for None)."""
        return check_kv_cache(cache, len(self.blocks), batch, self.config.n_kv_heads,
                              self.config.head_dim)

    def config_dict(self) -> dict:
        """A JSON-ready config that :func:`recurra.models.build_model` turns back into this model."""
        return {"architecture": "llama", **asdict(self.config)}

    # ----------------------------------------------------------------- transformers
    @classmethod
    def from_transformers(cls, model, max_len: int | None = None) -> LlamaLM:
        """Port a transformers ``LlamaForCausalLM`` (weights copied; same dtype and device)."""
        c = model.config
        if getattr(c, "model_type", None) != "llama":
            raise ValueError(f"from_transformers needs a LlamaForCausalLM (model_type 'llama'), "
                             f"got model_type {getattr(c, 'model_type', None)!r}")
        rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"from_transformers supports the default rotary embedding only, "
                             f"this model uses rope_type {rope_type!r}")
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        if getattr(c, "hidden_act", "silu") != "silu":
            raise ValueError(f"from_transformers needs hidden_act 'silu', got {c.hidden_act!r}")
        if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
            raise ValueError("from_transformers does not support attention_bias or mlp_bias")
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        tied = bool(getattr(c, "tie_word_embeddings", False))
        ours = cls(c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                   c.num_key_value_heads, head_dim, c.intermediate_size, float(c.rms_norm_eps),
                   float(theta), int(max_len or c.max_position_embeddings), tied)
        weight = model.model.embed_tokens.weight
        ours = ours.to(dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            ours.embedding.weight.copy_(weight)
            for block, layer in zip(ours.blocks, model.model.layers):
                a, m = layer.self_attn, layer.mlp
                block.norm_attn.copy_(layer.input_layernorm.weight)
                block.qkv.copy_(torch.cat((a.q_proj.weight, a.k_proj.weight,
                                           a.v_proj.weight)).t())
                block.out.copy_(a.o_proj.weight.t())
                block.norm_mlp.copy_(layer.post_attention_layernorm.weight)
                block.gate_up.copy_(torch.cat((m.gate_proj.weight, m.up_proj.weight)).t())
                block.down.copy_(m.down_proj.weight.t())
            ours.norm.copy_(model.model.norm.weight)
            if not tied:
                ours.head.copy_(model.lm_head.weight.t())
        return ours.eval()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


__all__ = ["LlamaConfig", "LlamaLM", "rms_norm", "rope_tables"]
