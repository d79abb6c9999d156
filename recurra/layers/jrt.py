"""JRT-RNN: prefix linear attention from "Just Read Twice" (Arora et al., arXiv 2407.05483).

The first M tokens of a sequence are a prefix read *non-causally* by an encoder with its own
key/value projections; every token is then read causally by the decoder:

    y_i = phi(q_i)^T (S_enc + sum_{j<=i} phi(k_j) v_j^T) / phi(q_i)^T (z_enc + sum_{j<=i} phi(k_j))
    S_enc = sum_{j<M} phi(ke_j) ve_j^T,    z_enc = sum_{j<M} phi(ke_j)

(phi: the Taylor map of Based by default). After the prefix the state is the same (S, z) as
linear attention, so decoding costs constant memory per token.

Prefix length: per call, ``layer(x, state, lengths, prefix_lengths=P)`` with P an int or one int
per row in [0, T] (0: no prefix, the layer is causal linear attention with the Taylor map); without
``prefix_lengths`` every row uses the layer's ``prefix_length`` attribute M (clipped to the row's
length). The prefix applies to rows that *start* a sequence in this call.

State: ``(S, z, seen, prefix)`` (``z`` only when normalised). ``seen`` (B,) counts the tokens
consumed so far and ``prefix`` (B,) is the prefix length of the row's sequence (both in x's float
dtype; 0 for an empty sequence). A call continuing a row (``seen > 0``) decodes causally; it must
come after the whole prefix (``seen >= prefix``), else ValueError: the prefix is read in one call.
So ``step`` works after a prefill that covered the prefix.

Causality: prefix positions read later prefix tokens, so the layer is not causal
(``causal = False``), but every position at or after the prefix reads only tokens before it and
the prefix: ``causal_after_prefix = True`` is what lets ``RecurrentLM`` accept it.

Training objective (next-token loss on the suffix plus the paper's masked-LM loss on the
prefix): :func:`recurra.train.prefix_objective.prefix_lm_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import State
from .linear_attention import LinearAttention
from .registry import register


def check_prefix_lengths(prefix_lengths, batch: int, steps: int,
                         device: torch.device) -> torch.Tensor | None:
    """Validate ``prefix_lengths``: an int or (B,) integers in [0, steps]. Returns a long (B,)
    tensor (or None when None)."""
    if prefix_lengths is None:
        return None
    if isinstance(prefix_lengths, bool):
        raise ValueError(f"prefix_lengths must be an int or ({batch},) ints, got a bool")
    if isinstance(prefix_lengths, int):
        prefix_lengths = torch.full((batch,), prefix_lengths, dtype=torch.long)
    prefix_lengths = torch.as_tensor(prefix_lengths)
    if prefix_lengths.dim() != 1 or prefix_lengths.shape[0] != batch:
        raise ValueError(f"prefix_lengths must be an int or have shape ({batch},) (one per "
                         f"sequence), got shape {tuple(prefix_lengths.shape)}")
    if prefix_lengths.is_floating_point() or prefix_lengths.is_complex() \
            or prefix_lengths.dtype == torch.bool:
        raise ValueError(f"prefix_lengths must hold integers, got {prefix_lengths.dtype}")
    if int(prefix_lengths.min()) < 0 or int(prefix_lengths.max()) > steps:
        raise ValueError(f"prefix_lengths must lie in [0, {steps}] (the time axis), got values "
                         f"in [{int(prefix_lengths.min())}, {int(prefix_lengths.max())}]")
    return prefix_lengths.to(device=device, dtype=torch.long)


class PrefixLinearAttention(LinearAttention):
    """JRT prefix linear attention (see the module docstring).

    Args:
        d_model, heads, feature_map, key_dim, normalize, chunk_size, eps: as ``LinearAttention``
            (defaults: Taylor map, key_dim 16, normalised).
        prefix_length: M, the default number of leading tokens read by the non-causal encoder
            (used when a call gives no ``prefix_lengths``).
    """

    causal = False
    #: positions at or after the prefix read only earlier tokens (see the module docstring)
    causal_after_prefix = True

    def __init__(self, d_model: int, prefix_length: int = 64, heads: int = 4,
                 feature_map: str = "taylor", key_dim: int | None = None,
                 normalize: bool | None = None, chunk_size: int = 64, eps: float = 1e-6):
        super().__init__(d_model, heads=heads, feature_map=feature_map, key_dim=key_dim,
                         normalize=normalize, chunk_size=chunk_size, eps=eps)
        if not isinstance(prefix_length, int) or isinstance(prefix_length, bool) \
                or prefix_length < 0:
            raise ValueError(f"prefix_length must be an int >= 0, got {prefix_length!r}")
        self.prefix_length = prefix_length
        self.ke_proj = torch.nn.Linear(d_model, heads * self.key_dim, bias=False)
        self.ve_proj = torch.nn.Linear(d_model, heads * self.value_dim, bias=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", prefix_length={self.prefix_length}"

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return super().state_shapes(batch_size) + [(batch_size,), (batch_size,)]

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        prefix_lengths: int | torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, State]:
        """The layer contract's forward, plus ``prefix_lengths`` (see the module docstring)."""
        state, lengths = self.check_call(x, state, lengths)
        prefix = check_prefix_lengths(prefix_lengths, x.shape[0], x.shape[1], x.device)
        return self._forward(x, state, lengths, prefix)

    def step(self, x_t: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """Decode one token; every row's state must come after a prefill covering its prefix."""
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(f"x_t must have shape (batch, {self.input_size}) for step(), "
                             f"got {shape}")
        if state is not None:
            state = self.check_state(state, x_t.unsqueeze(1))
        if state is None or bool((state[-2] < 0.5).any()):
            raise ValueError("step() needs the state of a prefill that read the prefix (run "
                             "forward on the prompt first); this state holds empty sequences")
        y, state = self.forward(x_t.unsqueeze(1), state)
        return y.squeeze(1), state

    def _forward(self, x, state, lengths, prefix=None):
        b, t, _ = x.shape
        memory, seen, row_prefix = state[:-2], state[-2], state[-1]
        row_len = (torch.full((b,), t, device=x.device, dtype=torch.long)
                   if lengths is None else lengths)
        reads = row_len > 0
        fresh = seen < 0.5
        if prefix is None:
            prefix = torch.full((b,), self.prefix_length, device=x.device, dtype=torch.long)
        elif bool((~fresh & reads & (prefix > 0)).any()):
            rows = (~fresh & reads & (prefix > 0)).nonzero().flatten().tolist()
            raise ValueError(f"prefix_lengths: rows {rows} continue a sequence (their state has "
                             "read tokens already); a prefix can only start a sequence (give 0 "
                             "for those rows, or no prefix_lengths)")
        inside = ~fresh & reads & (seen < row_prefix - 0.5)
        if bool(inside.any()):
            raise ValueError(
                f"state: rows {inside.nonzero().flatten().tolist()} stopped inside their prefix "
                f"(seen tokens {seen[inside].tolist()} < prefix {row_prefix[inside].tolist()}); "
                "the prefix must be read in one call (prefill at least the prefix before "
                "continuing)")
        # encoder over each fresh row's first min(length, prefix) tokens, non-causal
        n_enc = torch.where(fresh, torch.minimum(row_len, prefix), torch.zeros_like(row_len))
        width = min(t, int(n_enc.max()))
        if width > 0:
            enc_mask = (torch.arange(width, device=x.device).unsqueeze(0)
                        < n_enc.unsqueeze(1))                           # (B, width)
            xe = torch.where(enc_mask.unsqueeze(-1), x[:, :width],
                             torch.zeros((), dtype=x.dtype, device=x.device))
            w = enc_mask.to(x.dtype)[:, None, :, None]                  # (B, 1, width, 1)
            ke = self._features(self.ke_proj(xe)) * w
            ve = self._split_heads(self.ve_proj(xe)) * w
            enc = [memory[0] + ke.transpose(-1, -2) @ ve]
            if self.normalize:
                enc.append(memory[1] + ke.sum(2))
            memory = tuple(enc)
        y, memory = super()._forward(x, memory, lengths)
        new_prefix = torch.where(fresh & reads, prefix.to(row_prefix.dtype), row_prefix)
        return y, (*memory, seen + row_len.to(seen.dtype), new_prefix)


@register("jrt", "JRT-RNN prefix linear attention: non-causal encoder over the first M tokens, "
                 "causal Taylor-map decoder")
def build_jrt(d_model: int, **options) -> PrefixLinearAttention:
    return PrefixLinearAttention(d_model, **options)
