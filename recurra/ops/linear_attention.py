"""Causal linear attention: feature maps, the reference loop and the chunked parallel form.

With feature maps phi applied to queries and keys (``q = phi(q_raw)``, ``k = phi(k_raw)``), the
recurrence is

    S_t = S_{t-1} + k_t v_t^T            (F x Dv memory)
    z_t = z_{t-1} + k_t                  (F normaliser, only when ``normalize``)
    y_t = q_t^T S_t / (q_t^T z_t + eps)  (or q_t^T S_t when not normalised)

Layout: head-first, ``q, k`` of shape (B, H, T, F), ``v`` of shape (B, H, T, Dv); the state is
``(S,)`` or ``(S, z)`` with ``S`` (B, H, F, Dv) and ``z`` (B, H, F).

- ``linear_attention_reference``: the readable loop over time (the oracle).
- ``linear_attention_chunked``: chunks of ``chunk_size`` steps; inside a chunk the causal
  quadratic form, across chunks the summed chunk memories (no decay, so a cumulative sum).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

FEATURE_MAPS = ("identity", "elu", "taylor")


def feature_dim(kind: str, dim: int) -> int:
    """Size of ``feature_map(x, kind)`` for inputs of size ``dim``."""
    _check_kind(kind)
    return 1 + dim + dim * dim if kind == "taylor" else dim


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """Apply a feature map on the last axis.

    - ``identity``: phi(x) = x
    - ``elu``: phi(x) = elu(x) + 1 (positive; Katharopoulos et al. 2020)
    - ``taylor``: phi(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) sqrt(d))] (Based / JRT), so that
      phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt(d): the 2nd-order Taylor series of exp(s).
    """
    _check_kind(kind)
    if kind == "identity":
        return x
    if kind == "elu":
        return F.elu(x) + 1.0
    d = x.shape[-1]
    outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2) / (math.sqrt(2.0) * math.sqrt(d))
    return torch.cat([torch.ones_like(x[..., :1]), x / d ** 0.25, outer], dim=-1)


def _check_kind(kind: str) -> None:
    if kind not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {kind!r}")


def _check_qkv(q, k, v, initial_state, normalize):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"q and k must have the same shape (batch, heads, time, features), got "
            f"{tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must have shape (batch, heads, time, value_dim) = {tuple(q.shape[:3])} + (Dv,), "
            f"got {tuple(v.shape)}")
    b, h, _, f = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        s0 = q.new_zeros(b, h, f, dv)
        z0 = q.new_zeros(b, h, f) if normalize else None
        return s0, z0
    n = 2 if normalize else 1
    if len(initial_state) != n:
        raise ValueError(f"initial_state must hold {n} tensors (S{', z' if normalize else ''}), "
                         f"got {len(initial_state)}")
    if tuple(initial_state[0].shape) != (b, h, f, dv):
        raise ValueError(f"initial_state[0] (S) must have shape {(b, h, f, dv)}, "
                         f"got {tuple(initial_state[0].shape)}")
    if normalize and tuple(initial_state[1].shape) != (b, h, f):
        raise ValueError(f"initial_state[1] (z) must have shape {(b, h, f)}, "
                         f"got {tuple(initial_state[1].shape)}")
    return initial_state[0], (initial_state[1] if normalize else None)


def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    initial_state: tuple[torch.Tensor, ...] | None = None,
    normalize: bool = True, eps: float = 1e-6,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The recurrence, one step at a time. Returns ``y`` (B, H, T, Dv) and the final state."""
    S, z = _check_qkv(q, k, v, initial_state, normalize)
    ys = []
    for t in range(q.shape[2]):
        q_t, k_t, v_t = q[:, :, t], k[:, :, t], v[:, :, t]
        S = S + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        y_t = (q_t.unsqueeze(-2) @ S).squeeze(-2)
        if normalize:
            z = z + k_t
            y_t = y_t / ((q_t * z).sum(-1, keepdim=True) + eps)
        ys.append(y_t)
    y = torch.stack(ys, 2) if ys else v.new_zeros(v.shape)
    return y, ((S, z) if normalize else (S,))


def linear_attention_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    initial_state: tuple[torch.Tensor, ...] | None = None,
    normalize: bool = True, eps: float = 1e-6, chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Chunked parallel form, equal to ``linear_attention_reference``."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    S0, z0 = _check_qkv(q, k, v, initial_state, normalize)
    b, h, t, f = q.shape
    dv = v.shape[-1]
    c = max(1, min(chunk_size, t))
    n = -(-t // c)
    pad = n * c - t
    if pad:  # zero keys/values add nothing; the padded outputs are dropped
        q, k, v = (F.pad(a, (0, 0, 0, pad)) for a in (q, k, v))
    # (b*h*n, c, .) blocks: bmm takes the transposed operands as strided views (no copies)
    qc = q.reshape(b * h * n, c, f)
    kc = k.reshape(b * h * n, c, f)
    vc = v.reshape(b * h * n, c, dv)
    causal = torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    scores = torch.bmm(qc, kc.transpose(1, 2)).masked_fill_(~causal, 0.0)   # (bhn, c, c)
    kv = torch.bmm(kc.transpose(1, 2), vc).view(b, h, n, f, dv)
    kv_sum = kv.cumsum(2)
    S_before = S0.unsqueeze(2) + (kv_sum - kv)                       # memory before each chunk
    y = torch.baddbmm(torch.bmm(scores, vc), qc, S_before.view(b * h * n, f, dv))
    S_final = S0 + kv_sum[:, :, -1] if n else S0
    if normalize:
        kz = kc.view(b, h, n, c, f).sum(3)                           # (b, h, n, f)
        kz_sum = kz.cumsum(2)
        z_before = z0.unsqueeze(2) + (kz_sum - kz)
        den = scores.sum(-1) + torch.bmm(qc, z_before.view(b * h * n, f, 1)).squeeze(-1)
        y = y / (den.unsqueeze(-1) + eps)
        z_final = z0 + kz_sum[:, :, -1] if n else z0
    y = y.reshape(b, h, n * c, dv)[:, :, :t]
    return y, ((S_final, z_final) if normalize else (S_final,))
