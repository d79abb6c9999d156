"""State space duality (SSD): the selective scan of Mamba-2, three equal forms.

Per head, with a scalar decay ``a_t = exp(log_a_t)`` and a state ``h`` of shape (P, N):

    h_t = a_t h_{t-1} + x_t B_t^T        y_t = h_t C_t

Shapes (time on axis 1): ``x`` (b, T, H, P), ``log_a`` (b, T, H), ``B`` and ``C`` (b, T, G, N)
with G groups shared by H / G heads each; the state is (b, H, P, N). In Mamba-2,
``log_a = dt * A`` and ``x = dt * x_raw`` (the discretised input).

- ``ssd_reference``: the loop above (optionally renormalising the state, see
  ``max_state_norm``); the oracle.
- ``ssd_quadratic``: the dense masked form ``y = (L o C B^T) x`` with
  ``L_ij = a_{j+1} ... a_i`` for j <= i (the "attention" form); O(T^2).
- ``ssd_chunked``: the chunked SSD algorithm: quadratic inside chunks of ``chunk_size`` steps,
  the recurrence (a loop) across chunk boundaries; O(T).

``segsum`` computes the log-decays ``sum_{k=j+1..i} log_a_k`` by a masked cumulative sum rather
than a difference of cumulative sums, which loses precision when the sums grow large.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(log_a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T): ``out[..., i, j] = sum_{k=j+1..i} log_a[..., k]`` for j <= i and
    -inf above the diagonal (so that ``exp(segsum)`` is the causal decay matrix)."""
    t = log_a.shape[-1]
    rep = log_a.unsqueeze(-1).expand(*log_a.shape, t)          # rep[..., k, j] = log_a[k]
    strict = torch.ones(t, t, dtype=torch.bool, device=log_a.device).tril(-1)
    out = rep.masked_fill(~strict, 0.0).cumsum(-2)               # sum over j < k <= i
    lower = torch.ones(t, t, dtype=torch.bool, device=log_a.device).tril()
    return out.masked_fill(~lower, float("-inf"))


def check_ssd_inputs(x, log_a, B, C, initial_state):
    """Validate shapes; returns (groups, heads per group, initial state or zeros)."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (batch, time, heads, head_dim), got {tuple(x.shape)}")
    b, t, h, p = x.shape
    if log_a.shape != (b, t, h):
        raise ValueError(f"log_a must have shape (batch, time, heads) = {(b, t, h)}, "
                         f"got {tuple(log_a.shape)}")
    if B.dim() != 4 or B.shape[:2] != (b, t) or C.shape != B.shape:
        raise ValueError(f"B and C must have the same shape (batch, time, groups, state) with "
                         f"batch, time = {(b, t)}, got {tuple(B.shape)} and {tuple(C.shape)}")
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"the heads of x ({h}) must be divisible by the groups of B ({g})")
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    elif tuple(initial_state.shape) != (b, h, p, n):
        raise ValueError(f"initial_state must have shape (batch, heads, head_dim, state) = "
                         f"{(b, h, p, n)}, got {tuple(initial_state.shape)}")
    return g, h // g, initial_state


def _heads(BC: torch.Tensor, per_group: int) -> torch.Tensor:
    """(b, T, G, N) -> (b, T, H, N): each group serves ``per_group`` consecutive heads."""
    return BC.repeat_interleave(per_group, dim=2) if per_group > 1 else BC


def ssd_reference(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None = None, max_state_norm: float | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The recurrence, one step at a time. Returns ``y`` (b, T, H, P) and the final state.

    ``max_state_norm``: after each update, a head's state whose Frobenius norm exceeds it is
    scaled back to that norm (state normalisation against state collapse, "Stuffed Mamba").
    This is not a linear recurrence, so it has only this sequential form.
    ``mask`` (b, T) bool: steps where it is False leave the state as it is (padding).
    """
    _, per_group, h = check_ssd_inputs(x, log_a, B, C, initial_state)
    Bh, Ch = _heads(B, per_group), _heads(C, per_group)
    ys = []
    for t in range(x.shape[1]):
        h_new = (log_a[:, t].exp()[..., None, None] * h
                 + x[:, t].unsqueeze(-1) * Bh[:, t].unsqueeze(-2))
        if max_state_norm is not None:
            norm = h_new.flatten(-2).norm(dim=-1).clamp_min(1e-30)
            h_new = h_new * (max_state_norm / norm).clamp(max=1.0)[..., None, None]
        h = h_new if mask is None else torch.where(mask[:, t, None, None, None], h_new, h)
        ys.append((h @ Ch[:, t].unsqueeze(-1)).squeeze(-1))
    y = torch.stack(ys, 1) if ys else x.new_zeros(x.shape)
    return y, h


def ssd_quadratic(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense masked ("attention") form over the whole sequence; O(T^2) memory."""
    _, per_group, h0 = check_ssd_inputs(x, log_a, B, C, initial_state)
    Bh, Ch = _heads(B, per_group), _heads(C, per_group)
    la = log_a.transpose(1, 2)                                   # (b, H, T)
    L = segsum(la).exp()                                         # (b, H, T, T)
    scores = torch.einsum("bihn,bjhn->bhij", Ch, Bh) * L
    y = torch.einsum("bhij,bjhp->bihp", scores, x)
    cum = la.cumsum(-1)                                          # decay from the start to i
    y = y + torch.einsum("bihn,bhpn,bhi->bihp", Ch, h0, cum.exp())
    to_end = (cum[..., -1:] - cum).exp() if x.shape[1] else cum  # decay from j to the end
    final = torch.einsum("bjhp,bjhn,bhj->bhpn", x, Bh, to_end)
    if x.shape[1]:
        final = final + cum[..., -1].exp()[..., None, None] * h0
    else:
        final = h0
    return y, final


SLAB_BYTES = 2 << 20  # the intra-chunk temporaries of one slab of chunks (fits in L2)


def ssd_chunked(
    x: torch.Tensor, log_a: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
    initial_state: torch.Tensor | None = None, chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked SSD: equal to ``ssd_reference``; O(T * chunk_size) work, matmul-bound."""
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    g, per_group, h0 = check_ssd_inputs(x, log_a, B, C, initial_state)
    b, t, h, p = x.shape
    n = B.shape[-1]
    if t == 0:
        return x.new_zeros(x.shape), h0
    q = min(chunk_size, t)
    nc = -(-t // q)
    pad = nc * q - t
    if pad:  # zero inputs and zero log-decay (a = 1) leave the state unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        log_a = F.pad(log_a, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))
    # chunked, time-major inside a chunk: (b, groups, chunks, q, heads per group, p), a view of
    # x for one group; B and C (b, groups, chunks, q, n) are shared by a group's heads, which ride
    # along the matmuls' column axis (k * p) so B and C are never copied per head
    X = x.view(b, nc, q, g, per_group, p).permute(0, 3, 1, 2, 4, 5)     # (b,g,nc,q,k,p)
    A = log_a.view(b, nc, q, g, per_group).permute(0, 3, 1, 4, 2)       # (b,g,nc,k,q)
    Bc = B.view(b, nc, q, g, n).permute(0, 3, 1, 2, 4)                  # (b,g,nc,q,n)
    Cc = C.view(b, nc, q, g, n).permute(0, 3, 1, 2, 4)
    cum = A.cumsum(-1)                                                  # (b,g,nc,k,q)
    # 1. each chunk's contribution to the state at its end: (n, k*p) per chunk
    to_end = (cum[..., -1:] - cum).exp().transpose(-1, -2).unsqueeze(-1)   # (b,g,nc,q,k,1)
    Xd = (X * to_end).reshape(b, g, nc, q, per_group * p)
    states = Bc.transpose(-1, -2) @ Xd                                  # (b,g,nc,n,k*p)
    states = states.view(b, g, nc, n, per_group, p)
    # 2. across chunks (a loop: nc elementwise steps): the state entering each chunk
    chunk_decay = cum[..., -1].exp().view(b, g, nc, 1, per_group, 1)
    carry = h0.view(b, g, per_group, p, n).permute(0, 1, 4, 2, 3)       # (b,g,n,k,p)
    entering = []
    for decay_c, state_c in zip(chunk_decay.unbind(2), states.unbind(2)):  # unbind: one
        entering.append(carry)                                   # backward stack, not nc fills
        carry = decay_c * carry + state_c
    final = carry.permute(0, 1, 3, 4, 2)                                # (b,g,k,p,n)
    # 3. inside each chunk, the masked quadratic form per head, plus the entering state read
    # out; a slab of chunks at a time, so that the (q, q) decay and score matrices of a slab
    # stay in cache instead of being allocated (and page-faulted) for the whole sequence
    start_decay = cum.transpose(-1, -2).unsqueeze(-1).exp()            # (b,g,nc,q,k,1)
    per_chunk = b * g * per_group * q * max(q, p, n) * x.element_size()
    slab = max(1, min(nc, SLAB_BYTES // per_chunk))
    pieces = []
    # split, not slicing: the backward of split is one cat, that of each slice a full-size fill
    slabs = zip(*(v.split(slab, dim=2) for v in (Cc, Bc, X, A, start_decay)))
    for c0, (Cs, Bs, Xs, As, Ds) in zip(range(0, nc, slab), slabs):
        S = Cs.shape[2]
        L = segsum(As).exp()                                            # (b,g,S,k,q,q)
        scores = (Cs @ Bs.transpose(-1, -2)).unsqueeze(3) * L
        y_diag = scores @ Xs.transpose(3, 4)                            # (b,g,S,k,q,p)
        enter = torch.stack(entering[c0:c0 + S], 2).view(b, g, S, n, per_group * p)
        y_s = (Cs @ enter).view(b, g, S, q, per_group, p) * Ds + y_diag.transpose(3, 4)
        pieces.append(y_s.permute(0, 2, 3, 1, 4, 5).reshape(b, S * q, h, p))
    y = torch.cat(pieces, 1) if len(pieces) > 1 else pieces[0]
    if pad:
        y = y[:, :t]
    return y, final.reshape(b, h, p, n)
