"""First-order linear recurrences along time: ``h_t = a_t * h_{t-1} + b_t``.

Layout (batch first, time on axis 1):

- *diagonal*: ``a`` and ``b`` have the same shape ``(B, T, ...)``; the product is elementwise.
- *block*: ``a`` has shape ``(B, T, ..., K, K)`` and ``b`` shape ``(B, T, ..., K)``; the product
  is the matrix-vector product ``a_t @ h_{t-1}`` on the last axes (K x K blocks per channel; a
  dense D x D recurrence is the case of no channel axes, K = D).

``linear_scan(a, b, initial_state=None, reverse=False, method=...)`` returns every state ``h``
(shape of ``b``). ``initial_state`` has the shape of ``b`` without the time axis (zeros by
default). With ``reverse=True`` the recurrence runs from the end: ``h_t = a_t h_{t+1} + b_t``.

Methods:

- ``"reference"``: :func:`linear_scan_reference`, a plain loop over time (autograd through it);
- ``"oddeven"``: odd/even recursion (pair neighbours, solve the half-length problem, fill in the
  even steps): O(T) work in ~2 log2(T) vectorised levels;
- ``"chunked"``: two levels: a loop inside chunks of ~sqrt(T) steps (vectorised over chunks), a
  loop over the chunk carries, then one fix-up: O(T) work in ~2 sqrt(T) vectorised steps.

The two fast methods share a custom backward that is itself one reverse scan (the adjoint
``lambda_t = g_t + a_{t+1}^T lambda_{t+1}``), then ``db = lambda``, ``da = lambda h_{t-1}`` (outer
product for blocks) and ``d h_0 = a_1^T lambda_1``. Everything is products and sums (no division,
no logarithms), so float64 results equal the loop to rounding.
"""

from __future__ import annotations

import math

import torch

METHODS = ("oddeven", "chunked", "reference")
DEFAULT_METHOD = "oddeven"

#: below this length the fast methods run the plain loop (fewer dispatches)
_SMALL_T = 4


# ------------------------------------------------------------------------------- validation
def _check(a, b, initial_state, reverse, method):
    if not isinstance(b, torch.Tensor):
        raise ValueError(f"b must be a tensor of shape (batch, time, ...), got {type(b).__name__}")
    if not isinstance(a, torch.Tensor):
        raise ValueError(
            f"a must be a tensor of shape {tuple(b.shape)} (diagonal) or "
            f"{tuple(b.shape) + (b.shape[-1],)} (blocks), got {type(a).__name__}")
    if b.dim() < 2:
        raise ValueError(
            f"b must have shape (batch, time, ...) with at least 2 dimensions, got {tuple(b.shape)}")
    if not b.is_floating_point():
        raise ValueError(f"b must be a floating-point tensor, got {b.dtype}")
    if a.dtype != b.dtype:
        raise ValueError(f"a must have the dtype of b ({b.dtype}), got {a.dtype}")
    if a.device != b.device:
        raise ValueError(f"a must be on the device of b ({b.device}), got {a.device}")
    if a.shape == b.shape:
        block = False
    elif a.dim() == b.dim() + 1 and a.shape[:-1] == b.shape and a.shape[-2] == a.shape[-1]:
        block = True
    else:
        raise ValueError(
            f"a must have shape {tuple(b.shape)} (diagonal, like b) or "
            f"{tuple(b.shape) + (b.shape[-1],)} (K x K blocks acting on b's last axis), "
            f"got {tuple(a.shape)}")
    state_shape = (b.shape[0],) + tuple(b.shape[2:])
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            raise ValueError(f"initial_state must be None or a tensor of shape {state_shape}, "
                             f"got {type(initial_state).__name__}")
        if tuple(initial_state.shape) != state_shape:
            raise ValueError(
                f"initial_state must have shape {state_shape} (b without its time axis), "
                f"got {tuple(initial_state.shape)}")
        if initial_state.dtype != b.dtype or initial_state.device != b.device:
            raise ValueError(
                f"initial_state must have dtype {b.dtype} on {b.device} like b, got "
                f"{initial_state.dtype} on {initial_state.device}")
    if not isinstance(reverse, bool):
        raise ValueError(f"reverse must be a bool, got {reverse!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return block


# ------------------------------------------------------------------------------- primitives
# Layout kinds: "diag" (elementwise); "block" (K x K blocks on the last axes, as the user gives
# them); "soa" (small blocks stored component-major, a (B, T, K, K, R) and h (B, T, K, R) with the
# R channels innermost, so every block entry is a contiguous run of channels: the fast path).
_SOA_MAX_K = 4


def _apply(a: torch.Tensor, h: torch.Tensor, kind: str) -> torch.Tensor:
    """a * h (diag), a @ h on the last axes (block), or the same product in soa layout."""
    if kind == "diag":
        return a * h
    if kind == "soa":  # out[i, r] = sum_j a[i, j, r] h[j, r], unrolled over the small K
        k = h.shape[-2]
        out = a[..., :, 0, :] * h[..., 0:1, :]
        for j in range(1, k):
            out = out + a[..., :, j, :] * h[..., j:j + 1, :]
        return out
    return (a @ h.unsqueeze(-1)).squeeze(-1)


def _compose(a_later: torch.Tensor, a_earlier: torch.Tensor, kind: str) -> torch.Tensor:
    """Coefficient of two consecutive steps: a_later * a_earlier (or the matrix product)."""
    if kind == "diag":
        return a_later * a_earlier
    if kind == "soa":  # c[i, j, r] = sum_k a[i, k, r] b[k, j, r], unrolled over the small K
        k = a_later.shape[-2]
        out = a_later[..., :, 0:1, :] * a_earlier[..., 0:1, :, :]
        for m in range(1, k):
            out = out + a_later[..., :, m:m + 1, :] * a_earlier[..., m:m + 1, :, :]
        return out
    return a_later @ a_earlier


def _transpose(a: torch.Tensor, kind: str) -> torch.Tensor:
    return a if kind == "diag" else a.transpose(-1, -2)


def _to_soa(a, b, h0):
    """(B, T, *rest, K, K), (B, T, *rest, K), (B, *rest, K) -> soa layout with R = prod(rest)."""
    batch, steps, k = b.shape[0], b.shape[1], b.shape[-1]
    a = a.reshape(batch, steps, -1, k, k).permute(0, 1, 3, 4, 2).contiguous()
    b = b.reshape(batch, steps, -1, k).permute(0, 1, 3, 2).contiguous()
    h0 = h0.reshape(batch, -1, k).permute(0, 2, 1).contiguous()
    return a, b, h0


def _from_soa(h, shape):
    return h.permute(0, 1, 3, 2).reshape(shape)


# ------------------------------------------------------------------------------- reference
def linear_scan_reference(a: torch.Tensor, b: torch.Tensor,
                          initial_state: torch.Tensor | None = None,
                          reverse: bool = False) -> torch.Tensor:
    """The plain loop ``h_t = a_t h_{t-1} + b_t`` (autograd through it); same API as
    :func:`linear_scan`."""
    block = _check(a, b, initial_state, reverse, "reference")
    return _loop(a, b, initial_state, reverse, "block" if block else "diag")


def _loop(a, b, h, reverse, kind):
    if h is None:
        h = b.new_zeros((b.shape[0],) + tuple(b.shape[2:]))
    a_steps, b_steps = a.unbind(1), b.unbind(1)
    order = range(len(b_steps) - 1, -1, -1) if reverse else range(len(b_steps))
    out = [None] * len(b_steps)
    for t in order:
        h = _apply(a_steps[t], h, kind) + b_steps[t]
        out[t] = h
    if not out:
        return b.clone()
    return torch.stack(out, 1)


# ------------------------------------------------------------------------------- fast forwards
def _oddeven(a, b, h0, kind):
    """Forward scan by odd/even recursion (no autograd needed: called under no_grad)."""
    steps = b.shape[1]
    if steps <= _SMALL_T:
        return _loop(a, b, h0, False, kind)
    if steps % 2:
        head = _oddeven(a[:, :-1], b[:, :-1], h0, kind)
        last = _apply(a[:, -1], head[:, -1], kind) + b[:, -1]
        return torch.cat([head, last.unsqueeze(1)], 1)
    a_e, a_o = a[:, 0::2], a[:, 1::2]
    b_e, b_o = b[:, 0::2], b[:, 1::2]
    # h_{2i+1} = a_{2i+1} (a_{2i} h_{2i-1} + b_{2i}) + b_{2i+1}
    h_o = _oddeven(_compose(a_o, a_e, kind), _apply(a_o, b_e, kind) + b_o, h0, kind)
    prev = torch.cat([h0.unsqueeze(1), h_o[:, :-1]], 1)
    h_e = _apply(a_e, prev, kind) + b_e
    return torch.stack([h_e, h_o], 2).reshape(b.shape)


def _chunked(a, b, h0, kind):
    """Forward scan in two levels: inside chunks (vectorised over chunks), then across chunks."""
    steps = b.shape[1]
    if steps <= _SMALL_T:
        return _loop(a, b, h0, False, kind)
    size = max(1, math.isqrt(steps))
    chunks = -(-steps // size)
    pad = chunks * size - steps
    if pad:  # padding at the end never influences earlier states
        a = torch.cat([a, a.new_zeros((a.shape[0], pad) + tuple(a.shape[2:]))], 1)
        b = torch.cat([b, b.new_zeros((b.shape[0], pad) + tuple(b.shape[2:]))], 1)
    a = a.reshape((a.shape[0], chunks, size) + tuple(a.shape[2:]))
    b = b.reshape((b.shape[0], chunks, size) + tuple(b.shape[2:]))
    # level 1: local states from zero and cumulative coefficients, per chunk
    local, coef = [], []
    h = b[:, :, 0]
    c = a[:, :, 0]
    local.append(h)
    coef.append(c)
    for i in range(1, size):
        h = _apply(a[:, :, i], h, kind) + b[:, :, i]
        c = _compose(a[:, :, i], c, kind)
        local.append(h)
        coef.append(c)
    local = torch.stack(local, 2)  # (B, C, L, ...)
    coef = torch.stack(coef, 2)
    # level 2: the state entering each chunk
    carries = [h0]
    h = h0
    for j in range(chunks - 1):
        h = _apply(coef[:, j, -1], h, kind) + local[:, j, -1]
        carries.append(h)
    carries = torch.stack(carries, 1).unsqueeze(2)  # (B, C, 1, ...)
    out = local + _apply(coef, carries, kind)
    out = out.reshape((b.shape[0], chunks * size) + tuple(b.shape[3:]))
    return out[:, :steps]


_FORWARDS = {"oddeven": _oddeven, "chunked": _chunked}


class _LinearScan(torch.autograd.Function):
    """Forward scan with the adjoint (a reverse scan) as its backward."""

    @staticmethod
    def forward(ctx, a, b, h0, method, block):
        with torch.no_grad():
            if block and b.shape[-1] <= _SOA_MAX_K:
                h = _from_soa(_FORWARDS[method](*_to_soa(a, b, h0), "soa"), b.shape)
            else:
                h = _FORWARDS[method](a, b, h0, "block" if block else "diag")
        ctx.save_for_backward(a, h0, h)
        ctx.method, ctx.block = method, block
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h0, h = ctx.saved_tensors
        method, block = ctx.method, ctx.block
        kind = "block" if block else "diag"
        # lambda_t = g_t + a_{t+1}^T lambda_{t+1}: a forward scan on the flipped sequence whose
        # coefficient at flipped position s >= 1 is a_{T-s}^T (position 0 multiplies a zero state)
        a_t = _transpose(a, kind).flip(1)
        coef = torch.cat([torch.zeros_like(a_t[:, :1]), a_t[:, :-1]], 1)
        lam = _LinearScan.apply(coef, grad_h.flip(1), torch.zeros_like(h0), method,
                                block).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], 1)
        grad_a = lam.unsqueeze(-1) * h_prev.unsqueeze(-2) if block else lam * h_prev
        grad_h0 = _apply(_transpose(a[:, 0], kind), lam[:, 0], kind)
        return grad_a, lam, grad_h0, None, None


# ------------------------------------------------------------------------------- public API
def linear_scan(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                reverse: bool = False, method: str = DEFAULT_METHOD) -> torch.Tensor:
    """All states of ``h_t = a_t h_{t-1} + b_t`` along axis 1 (see the module docstring).

    Args:
        a: coefficients, shape of ``b`` (diagonal) or ``b.shape + (K,)`` (K x K blocks).
        b: inputs, shape (B, T, ...).
        initial_state: the state before the first step (after the last with ``reverse``),
            shape of ``b`` without axis 1; zeros when None.
        reverse: run from the end, ``h_t = a_t h_{t+1} + b_t``.
        method: "oddeven" (default), "chunked" or "reference" (the loop).
    Returns:
        h with the shape of ``b``; differentiable w.r.t. a, b and initial_state.
    """
    block = _check(a, b, initial_state, reverse, method)
    if method == "reference":
        return _loop(a, b, initial_state, reverse, "block" if block else "diag")
    if b.shape[1] == 0:
        return b.clone()
    h0 = initial_state
    if h0 is None:
        h0 = b.new_zeros((b.shape[0],) + tuple(b.shape[2:]))
    if reverse:
        return _LinearScan.apply(a.flip(1), b.flip(1), h0, method, block).flip(1)
    return _LinearScan.apply(a, b, h0, method, block)
