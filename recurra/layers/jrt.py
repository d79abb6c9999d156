"""JRT-RNN: prefix linear attention from "Just Read Twice" (Arora et al., arXiv 2407.05483).

The first ``prefix_length`` (M) tokens of a sequence are a prefix read *non-causally* by an encoder
with its own key/value projections; every token is then read causally by the decoder:

    y_i = phi(q_i)^T (S_enc + sum_{j<=i} phi(k_j) v_j^T) / phi(q_i)^T (z_enc + sum_{j<=i} phi(k_j))
    S_enc = sum_{j<M} phi(ke_j) ve_j^T,    z_enc = sum_{j<M} phi(ke_j)

(phi: the Taylor map of Based by default). After the prefix the state is the same (S, z) as
linear attention, so decoding costs constant memory per token.

State: ``(S, z, seen)`` where ``seen`` (B,) counts the tokens consumed so far (stored in x's
float dtype; it is only compared against M). A call whose state has ``seen == 0`` starts a
sequence: its first ``min(length, M)`` tokens form the prefix. A call with ``seen >= M`` continues
decoding causally, so ``step`` works after a prefill of at least M tokens. Continuing a sequence
that stopped inside its prefix raises ValueError: the prefix must be read in one call.

Because prefix positions read later prefix tokens, the layer is not causal (``causal = False``)
but it does have ``step`` for decoding after the prefix.

Training: ``prefix_mlm_loss`` is the paper's masked-LM loss on the prefix (mask 15% of the prefix
tokens, predict them at their own positions); ``jrt_loss`` adds it, weighted 0.25, to next-token
cross-entropy.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import State
from .linear_attention import LinearAttention
from .registry import register


class PrefixLinearAttention(LinearAttention):
    """JRT prefix linear attention (see the module docstring).

    Args:
        d_model, heads, feature_map, key_dim, normalize, chunk_size, eps: as ``LinearAttention``
            (defaults: Taylor map, key_dim 16, normalised).
        prefix_length: M, the number of leading tokens read by the non-causal encoder.
    """

    causal = False

    def __init__(self, d_model: int, prefix_length: int = 64, heads: int = 4,
                 feature_map: str = "taylor", key_dim: int | None = None,
                 normalize: bool | None = None, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__(d_model, heads=heads, feature_map=feature_map, key_dim=key_dim,
                         normalize=normalize, chunk_size=chunk_size, eps=eps)
        if not isinstance(prefix_length, int) or prefix_length < 1:
            raise ValueError(f"prefix_length must be a positive int, got {prefix_length!r}")
        self.prefix_length = prefix_length
        self.ke_proj = nn.Linear(d_model, heads * self.key_dim, bias=False)
        self.ve_proj = nn.Linear(d_model, heads * self.value_dim, bias=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prefix_length={self.prefix_length}"

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return super().state_shapes(batch_size) + [(batch_size,)]

    def step(self, x_t: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Decode one token; the state must come after a prefill of at least M tokens."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must have shape (batch, {self.input_size}) for step(), "
                             f"got {shape}")
        if state is None:
            raise ValueError("step() needs the state of a prefill of at least prefix_length="
                             f"{self.prefix_length} tokens (run forward on the prompt first)")
        y, state = self.forward(x_t.unsqueeze(1), state)
        return y.squeeze(1), state

    def _forward(self, x, state, lengths):
        b, t, _ = x.shape
        memory, seen = state[:-1], state[-1]
        m = self.prefix_length
        row_len = (torch.full((b,), t, device=x.device, dtype=torch.long)
                   if lengths is None else lengths)
        fresh = seen < 0.5
        past_prefix = seen >= m - 0.5
        bad = ~fresh & ~past_prefix & (row_len > 0)
        if bool(bad.any()):
            raise ValueError(
                f"state: rows {bad.nonzero().flatten().tolist()} stopped inside their prefix "
                f"(seen tokens {seen[bad].tolist()} < prefix_length={m}); the prefix must be "
                "read in one call (prefill at least prefix_length tokens before continuing)")
        # encoder over each fresh row's first min(length, M) tokens, non-causal
        n_enc = min(t, m)
        if bool(fresh.any()) and n_enc > 0:
            prefix = torch.where(fresh, row_len.clamp(max=m), torch.zeros_like(row_len))
            enc_mask = (torch.arange(n_enc, device=x.device).unsqueeze(0)
                        < prefix.unsqueeze(1))                          # (B, n_enc)
            xe = torch.where(enc_mask.unsqueeze(-1), x[:, :n_enc],
                             torch.zeros((), dtype=x.dtype, device=x.device))
            w = enc_mask.to(x.dtype)[:, None, :, None]                  # (B, 1, n_enc, 1)
            ke = self._features(self.ke_proj(xe)) * w
            ve = self._split_heads(self.ve_proj(xe)) * w
            enc = [memory[0] + ke.transpose(-1, -2) @ ve]
            if self.normalize:
                enc.append(memory[1] + ke.sum(2))
            memory = tuple(enc)
        y, memory = super()._forward(x, memory, lengths)
        return y, (*memory, seen + row_len.to(seen.dtype))


def prefix_mlm_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    prefix_length: int,
    mask_token_id: int,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Masked-LM loss on the prefix, the auxiliary objective of JRT-RNN training.

    Replaces a random ``mask_prob`` fraction of each row's first ``prefix_length`` tokens (at
    least one per batch) by ``mask_token_id``, runs ``logits_fn`` (tokens (B, T) -> logits
    (B, T, V), e.g. a ``RecurrentLM`` built with ``layer="jrt"``) on the corrupted tokens, and
    returns the mean cross-entropy of predicting each masked token *at its own position* (the
    prefix encoder lets prefix positions see the whole prefix).
    """
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError("tokens must be an integer tensor of shape (batch, time), got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    if not isinstance(prefix_length, int) or prefix_length < 1:
        raise ValueError(f"prefix_length must be a positive int, got {prefix_length!r}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob!r}")
    b, t = tokens.shape
    m = min(prefix_length, t)
    masked = torch.rand(b, m, generator=generator) < mask_prob
    if not bool(masked.any()):
        masked[torch.randint(0, b, (1,), generator=generator),
               torch.randint(0, m, (1,), generator=generator)] = True
    masked = masked.to(tokens.device)
    corrupted = tokens.clone()
    corrupted[:, :m] = torch.where(masked, torch.full_like(tokens[:, :m], mask_token_id),
                                   tokens[:, :m])
    logits = logits_fn(corrupted)
    if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits_fn must return logits of shape (batch, time, vocab) = "
                         f"{tuple(tokens.shape)} + (V,), got {tuple(logits.shape)}")
    return F.cross_entropy(logits[:, :m][masked], tokens[:, :m][masked])


def jrt_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    tokens: torch.Tensor,
    prefix_length: int,
    mask_token_id: int,
    mlm_weight: float = 0.25,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy on ``tokens`` plus ``mlm_weight`` x ``prefix_mlm_loss``.

    Two forward passes: one on the clean tokens (next-token loss), one on the masked prefix.
    """
    logits = logits_fn(tokens)
    lm = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    mlm = prefix_mlm_loss(logits_fn, tokens, prefix_length, mask_token_id, mask_prob, generator)
    return lm + mlm_weight * mlm


@register("jrt", "JRT-RNN prefix linear attention: non-causal encoder over the first M tokens, "
                 "causal Taylor-map decoder")
def build_jrt(d_model: int, **options) -> PrefixLinearAttention:
    return PrefixLinearAttention(d_model, **options)
