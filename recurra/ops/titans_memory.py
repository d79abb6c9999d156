"""Titans' neural long-term memory (Behrouz et al., arXiv 2501.00663): test-time learning of an MLP.

The memory is an MLP ``M_W`` (depth 1: ``M(k) = k W1``; depth 2: ``M(k) = silu(k W1) W2 / sqrt(n)``
with n the hidden width: the scale keeps a gradient step on W2 of size theta * |a|^2 below 1 at
any width, without it a wide memory diverges at test time), one per
row of a leading "group" axis G (batch x heads). For token t with key k_t, value v_t, query q_t and
gates theta_t (learning rate), eta_t (momentum), alpha_t (forgetting), all in (0, 1):

    u_t = -theta_t * grad_W || M_{W'}(k_t) - v_t ||^2      at the *base* weights W'
    S_t = eta_t S_{t-1} + u_t                               (surprise with momentum)
    W_t = (1 - alpha_t) W_{t-1} + S_t                       (forgetting)
    y_t = M_{W_t}(q_t)                                      (read after the write)

The base weights are re-based every ``chunk`` tokens (the paper's mini-batch b): W' is the memory
at the start of the current chunk, so the gradients inside a chunk are independent of each other
and the chunk can be computed in parallel. ``chunk = 1`` is plain online SGD with momentum.

The state is ``(W..., S..., W'..., phase)``: weights, momentum, base weights (tuples with one
tensor per MLP matrix) and ``phase`` (G,), the number of tokens already seen in the current chunk
(0 <= phase < chunk; a float tensor holding integers). At phase 0 the next token starts a new
chunk and the base is the current W (the stored base is then ignored); after a token that ends a
chunk the returned base is the new W.

Two forms:
- :func:`neural_memory_reference`: the token loop, with the gradient taken by ``torch.func.grad``
  (the oracle);
- :func:`neural_memory_chunked`: inside a chunk the gradients are closed-form outer products, the
  momentum and forgetting recurrences are unrolled into two lower-triangular decay matrices
  (log-space, no division), and retrieval of every token becomes a masked attention-like product;
  chunks run in sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, ...]


# ----------------------------------------------------------------------------- MLP memory
def memory_apply(weights: Weights, x: torch.Tensor) -> torch.Tensor:
    """M_W(x) for x (G, ..., d_key): depth 1 ``x W1``, depth 2 ``silu(x W1) W2 / sqrt(hidden)``."""
    if len(weights) == 1:
        return x @ weights[0]
    return hidden_activation(x @ weights[0]) @ weights[1]


def hidden_activation(z: torch.Tensor) -> torch.Tensor:
    """silu(z) / sqrt(hidden width): the hidden layer of the depth-2 memory."""
    return F.silu(z) * z.shape[-1] ** -0.5


def _silu_grad(z):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _check(q, k, v, theta, eta, alpha, weights, momentum, base, phase, chunk):
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if k.dim() != 3:
        raise ValueError(f"k must have shape (groups, time, d_key), got {tuple(k.shape)}")
    g, t, dk = k.shape
    if q.shape != k.shape:
        raise ValueError(f"q must have the shape of k {tuple(k.shape)}, got {tuple(q.shape)}")
    if v.dim() != 3 or v.shape[:2] != (g, t):
        raise ValueError(f"v must have shape ({g}, {t}, d_value), got {tuple(v.shape)}")
    for name, gate in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        if gate.shape != (g, t):
            raise ValueError(f"{name} must have shape ({g}, {t}) (groups, time), "
                             f"got {tuple(gate.shape)}")
    if len(weights) not in (1, 2) or len(momentum) != len(weights) or len(base) != len(weights):
        raise ValueError("weights, momentum and base must be tuples of 1 or 2 matrices each")
    for name, ws in (("weights", weights), ("momentum", momentum), ("base", base)):
        if ws[0].shape[:2] != (g, dk) or ws[-1].shape[0] != g or ws[-1].shape[-1] != v.shape[-1]:
            raise ValueError(f"{name} must map d_key={dk} to d_value={v.shape[-1]} for {g} "
                             f"groups, got shapes {[tuple(w.shape) for w in ws]}")
    if phase.shape != (g,):
        raise ValueError(f"phase must have shape ({g},), got {tuple(phase.shape)}")


def phase_as_long(phase: torch.Tensor, chunk: int) -> torch.Tensor:
    """Validate a phase tensor (integers in [0, chunk)) and return it as long."""
    p = torch.round(phase.detach())
    if bool(((phase.detach() - p).abs() > 0.25).any()) or bool(((p < 0) | (p >= chunk)).any()):
        raise ValueError(f"phase must hold integers in [0, {chunk}) (tokens seen in the current "
                         f"chunk), got {phase.detach().tolist()}")
    return p.long()


# ----------------------------------------------------------------------------- reference
def neural_memory_reference(q, k, v, theta, eta, alpha, weights, momentum, base, phase, chunk):
    """Token loop (the oracle). Returns ``(y (G, T, d_value), (weights, momentum, base, phase))``."""
    _check(q, k, v, theta, eta, alpha, weights, momentum, base, phase, chunk)
    p = phase_as_long(phase, chunk)

    def loss(ws, k_t, v_t):
        return ((memory_apply(ws, k_t) - v_t) ** 2).sum()

    grad_one = torch.func.vmap(torch.func.grad(loss))  # per group: d loss / d weights
    W, S, Wb = tuple(weights), tuple(momentum), tuple(base)
    ys = []
    for t in range(k.shape[1]):
        start = p == 0
        Wb = tuple(torch.where(_bc(start, w), w, b) for w, b in zip(W, Wb))
        grads = grad_one(Wb, k[:, t], v[:, t])
        S = tuple(_bc(eta[:, t], s) * s - _bc(theta[:, t], gr) * gr for s, gr in zip(S, grads))
        W = tuple(_bc(1 - alpha[:, t], w) * w + s for w, s in zip(W, S))
        ys.append(memory_apply(W, q[:, t].unsqueeze(1)).squeeze(1))
        p = (p + 1) % chunk
        Wb = tuple(torch.where(_bc(p == 0, w), w, b) for w, b in zip(W, Wb))
    y = torch.stack(ys, 1) if ys else v.new_zeros(v.shape)
    return y, (W, S, Wb, phase + (p - phase_as_long(phase, chunk)).to(phase.dtype))


def _bc(scalar_per_group, like):
    return scalar_per_group.reshape(-1, *([1] * (like.dim() - 1)))


# ----------------------------------------------------------------------------- chunked
def neural_memory_chunked(q, k, v, theta, eta, alpha, weights, momentum, base, phase, chunk,
                          lengths=None):
    """Chunk-parallel form; same result as the reference.

    ``lengths`` (G,) (optional): row g reads only its first ``lengths[g]`` tokens; its final state
    is the one after them and ``y`` is 0 beyond them.
    """
    _check(q, k, v, theta, eta, alpha, weights, momentum, base, phase, chunk)
    g, steps, _ = k.shape
    dev = k.device
    p = phase_as_long(phase, chunk)
    n = torch.full((g,), steps, device=dev, dtype=torch.long) if lengths is None else lengths
    # align every row's chunks: row g's token t goes to slot t + p[g]; other slots are no-ops
    n_chunks = -(-(steps + int(p.max())) // chunk)  # ceil
    slots = n_chunks * chunk
    src = torch.arange(slots, device=dev).unsqueeze(0) - p.unsqueeze(1)  # (G, slots)
    real = (src >= 0) & (src < n.unsqueeze(1))
    idx = src.clamp(0, max(steps - 1, 0))

    def take(x, fill):
        if steps == 0:
            return x.new_full((g, slots, *x.shape[2:]), fill)
        ix = idx.view(g, slots, *([1] * (x.dim() - 2))).expand(g, slots, *x.shape[2:])
        out = x.gather(1, ix)
        return torch.where(real.view(g, slots, *([1] * (x.dim() - 2))), out,
                           torch.full((), fill, dtype=x.dtype, device=dev))

    qs, ks, vs = take(q, 0.0), take(k, 0.0), take(v, 0.0)
    th, et, al = take(theta, 0.0), take(eta, 1.0), take(alpha, 0.0)
    on = real.to(k.dtype)  # 1 for real tokens: only they add momentum to the weights

    W, S = tuple(weights), tuple(momentum)
    first_base = tuple(torch.where(_bc(p == 0, w), w, b) for w, b in zip(W, base))
    last_chunk = (p + n - 1).div(chunk, rounding_mode="floor")  # chunk of each row's last token
    final_base = tuple(base)
    ys = []
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).tril()
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        Wb = first_base if c == 0 else W
        final_base = tuple(torch.where(_bc(last_chunk == c, b), b, f)
                           for b, f in zip(Wb, final_base))
        y_c, W, S = _chunk(qs[:, sl], ks[:, sl], vs[:, sl], th[:, sl], et[:, sl], al[:, sl],
                           on[:, sl], W, S, Wb, tri)
        ys.append(y_c)
    y = torch.cat(ys, 1) if ys else v.new_zeros(g, 0, v.shape[-1])
    # back to the rows' own time axes
    back = (torch.arange(steps, device=dev).unsqueeze(0) + p.unsqueeze(1)).clamp(max=max(slots - 1, 0))
    if steps:
        y = y.gather(1, back.unsqueeze(-1).expand(g, steps, y.shape[-1]))
        y = torch.where((torch.arange(steps, device=dev).unsqueeze(0) < n.unsqueeze(1)).unsqueeze(-1),
                        y, torch.zeros((), dtype=y.dtype, device=dev))
    else:
        y = v.new_zeros(v.shape)
    p_end = (p + n) % chunk
    ended = (p_end == 0) & (n > 0)
    final_base = tuple(torch.where(_bc(ended, w), w, b) for w, b in zip(W, final_base))
    # the phase passes through as phase + integer (so a state's phase entry is differentiable
    # like every other entry, with gradient 1, whichever form computed it)
    return y, (W, S, final_base, phase + (p_end - p).to(phase.dtype))


def _chunk(q, k, v, theta, eta, alpha, on, W, S, Wb, tri):
    """One chunk of b tokens from (W, S) with all gradients at the base Wb."""
    # gradients at the base: u_i = -theta_i * (x_i^T delta_i) per matrix (outer products)
    if len(Wb) == 1:
        xs = (k,)
        deltas = (2 * (k @ Wb[0] - v),)
    else:
        z = k @ Wb[0]
        a = hidden_activation(z)
        d2 = 2 * (a @ Wb[1] - v)
        d1 = (d2 @ Wb[1].transpose(1, 2)) * _silu_grad(z) * z.shape[-1] ** -0.5
        xs, deltas = (k, a), (d1, d2)
    # decays inside the chunk (log space, masked before exp)
    log_keep, log_eta = torch.log1p(-alpha), torch.log(eta)
    lb = torch.cumsum(log_keep, 1)  # log beta_t
    le = torch.cumsum(log_eta, 1)  # log E_t
    Bm = torch.exp(_segsum(log_keep, tri)) * on.unsqueeze(1)  # beta_t / beta_s, s <= t
    Em = torch.exp(_segsum(log_eta, tri))  # E_s / E_i, i <= s
    Wm = Bm @ Em  # (G, b, b): weight of u_i in W_t
    gS = (Bm @ torch.exp(le).unsqueeze(-1)).squeeze(-1)  # weight of S_0 in W_t
    beta = torch.exp(lb)  # weight of W_0 in W_t
    coef = Wm * (-theta).unsqueeze(1)  # (G, t, i)
    # retrieval with W_t for every t, matrix by matrix
    h = q
    for layer, (w0, s0, x_i, d_i) in enumerate(zip(W, S, xs, deltas)):
        if layer == 1:
            h = hidden_activation(h)
        h = (beta.unsqueeze(-1) * (h @ w0) + gS.unsqueeze(-1) * (h @ s0)
             + (coef * (h @ x_i.transpose(1, 2))) @ d_i)
    # state at the end of the chunk
    e_end = torch.exp(le[:, -1])
    w_last = coef[:, -1]  # (G, b)
    s_last = Em[:, -1] * (-theta)
    W_new = tuple(_bc(beta[:, -1], w0) * w0 + _bc(gS[:, -1], s0) * s0
                  + x_i.transpose(1, 2) @ (w_last.unsqueeze(-1) * d_i)
                  for w0, s0, x_i, d_i in zip(W, S, xs, deltas))
    S_new = tuple(_bc(e_end, s0) * s0 + x_i.transpose(1, 2) @ (s_last.unsqueeze(-1) * d_i)
                  for s0, x_i, d_i in zip(S, xs, deltas))
    return h, W_new, S_new


def _segsum(x: torch.Tensor, tri: torch.Tensor) -> torch.Tensor:
    """(G, b) -> (G, b, b): sum_{j=s+1..t} x_j at [t, s] for s <= t, -inf above the diagonal.

    A masked cumulative sum (not a difference of cumulative sums), so x = -inf is fine.
    """
    b = x.shape[1]
    strict = torch.ones(b, b, dtype=torch.bool, device=x.device).tril(-1)
    rep = torch.where(strict, x.unsqueeze(2).expand(*x.shape, b),
                      torch.zeros((), dtype=x.dtype, device=x.device))
    out = torch.cumsum(rep, 1)
    return torch.where(tri, out, torch.tensor(float("-inf"), dtype=x.dtype, device=x.device))
