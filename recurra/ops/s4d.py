"""Diagonal state space models (S4D; Gu et al. 2022): initialisations, discretisation, and the
FFT-convolution parallel form next to the recurrence.

Per channel h, a complex diagonal continuous SSM with N/2 modes (conjugate pairs are implied, so
the output is twice the real part):

    x'(t) = diag(lambda) x(t) + B u(t)          y(t) = 2 Re(C x(t)) + D u(t)

Discretised with step ``dt`` (``discretize``):

- ``"zoh"``:      A_bar = exp(dt lambda),   B_bar = (exp(dt lambda) - 1) / lambda * B
- ``"bilinear"``: A_bar = (1 + dt lambda / 2) / (1 - dt lambda / 2),  B_bar = dt / (1 - dt lambda / 2) * B

Recurrence (0-based, ``x_{-1}`` the initial state): ``x_t = A_bar x_{t-1} + B_bar u_t``,
``y_t = 2 Re(C x_t) + D u_t``. Its convolution form: ``y = K * u + D u + 2 Re(C A_bar^{t+1} x_{-1})``
with the kernel ``K_l = 2 Re(sum_n C_n B_bar_n A_bar_n^l)`` (a Vandermonde product).

Shapes: ``u`` (B, H, T) real; ``lam``, ``B``, ``C`` (H, N2) complex; ``dt``, ``D`` (H,) real;
state (B, H, N2) complex. Layers store the state as a real view (B, H, N2, 2).

- ``s4d_reference``: the recurrence in a loop (the oracle).
- ``s4d_fft``: the kernel by Vandermonde powers, the causal convolution by FFT (length 2T),
  the final state by a two-level (chunked) Vandermonde product; O(T log T).

Initialisations (``init_lambda``): ``"legs"`` (the eigenvalues of the normal part of HiPPO-LegS,
``hippo_legs``), ``"lin"`` (-1/2 + i pi n), ``"inv"`` (-1/2 + i N/pi (N/(2n+1) - 1)).
"""

from __future__ import annotations

import math

import torch

INITS = ("legs", "lin", "inv")
DISCRETIZATIONS = ("zoh", "bilinear")


# ------------------------------------------------------------------------------ initialisation
def hippo_legs(n: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HiPPO-LegS ``(A, B, P)``: A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k), -(n+1) (n = k), 0 (n < k);
    B_n = sqrt(2n+1); P_n = sqrt(n + 1/2), so that A + P P^T is normal (= -I/2 + skew)."""
    q = torch.sqrt(2 * torch.arange(n, dtype=dtype) + 1)
    A = -(q.unsqueeze(1) * q.unsqueeze(0)).tril(-1) - torch.diag(torch.arange(n, dtype=dtype) + 1)
    P = torch.sqrt(torch.arange(n, dtype=dtype) + 0.5)
    return A, q.clone(), P


def init_lambda(kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lambda, B)`` for N = ``n`` state size (``n // 2`` complex modes, complex128).

    ``legs`` uses the eigenvectors to project HiPPO's B; ``lin`` and ``inv`` use B = 1.
    """
    if kind not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {kind!r}")
    if not isinstance(n, int) or n < 2 or n % 2:
        raise ValueError(f"d_state must be an even int >= 2 (conjugate pairs), got {n!r}")
    n2 = n // 2
    idx = torch.arange(n2, dtype=torch.float64)
    if kind == "lin":
        lam = torch.complex(torch.full_like(idx, -0.5), math.pi * idx)
        return lam, torch.ones(n2, dtype=torch.complex128)
    if kind == "inv":
        lam = torch.complex(torch.full_like(idx, -0.5), n / math.pi * (n / (2 * idx + 1) - 1))
        return lam, torch.ones(n2, dtype=torch.complex128)
    A, B, P = hippo_legs(n)
    normal = A + P.unsqueeze(1) * P.unsqueeze(0)
    skew = normal + 0.5 * torch.eye(n, dtype=torch.float64)    # antisymmetric
    # eigenvalues of the antisymmetric part are i*w: use the Hermitian matrix -i*skew
    w, V = torch.linalg.eigh(-1j * skew.to(torch.complex128))
    keep = w > 0                                                # one of each conjugate pair
    w, V = w[keep], V[:, keep]
    order = torch.argsort(w)
    w, V = w[order], V[:, order]
    lam = torch.complex(torch.full_like(w, -0.5), w)
    return lam, V.conj().T @ B.to(torch.complex128)


# ------------------------------------------------------------------------------ discretisation
def discretize(lam: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str = "zoh"):
    """``(A_bar, B_bar)``, complex (H, N2), for ``lam, B`` (H, N2) and ``dt`` (H,)."""
    if method not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {method!r}")
    dl = dt.unsqueeze(-1) * lam
    if method == "zoh":
        A_bar = dl.exp()
        return A_bar, (A_bar - 1) / lam * B
    half = 1 - dl / 2
    return (1 + dl / 2) / half, dt.unsqueeze(-1) / half * B


def _check(u, A_bar, B_bar, C, D, initial_state):
    if u.dim() != 3:
        raise ValueError(f"u must have shape (batch, channels, time), got {tuple(u.shape)}")
    b, h, _ = u.shape
    n2 = A_bar.shape[-1]
    for name, a in (("A_bar", A_bar), ("B_bar", B_bar), ("C", C)):
        if tuple(a.shape) != (h, n2):
            raise ValueError(f"{name} must have shape (channels, modes) = {(h, n2)}, "
                             f"got {tuple(a.shape)}")
    if tuple(D.shape) != (h,):
        raise ValueError(f"D must have shape ({h},), got {tuple(D.shape)}")
    if initial_state is None:
        return torch.zeros(b, h, n2, dtype=A_bar.dtype, device=u.device)
    if tuple(initial_state.shape) != (b, h, n2) or not initial_state.is_complex():
        raise ValueError(f"initial_state must be complex of shape {(b, h, n2)}, "
                         f"got {initial_state.dtype} {tuple(initial_state.shape)}")
    return initial_state


def s4d_reference(u, A_bar, B_bar, C, D, initial_state=None):
    """The recurrence, one step at a time. Returns ``y`` (B, H, T) and the final state."""
    x = _check(u, A_bar, B_bar, C, D, initial_state)
    ys = []
    for t in range(u.shape[-1]):
        u_t = u[:, :, t]
        x = A_bar * x + B_bar * u_t.unsqueeze(-1)
        ys.append(2 * (x * C).sum(-1).real + D * u_t)
    y = torch.stack(ys, -1) if ys else u.new_zeros(u.shape)
    return y, x


def powers(A_bar: torch.Tensor, length: int, start: int = 0) -> torch.Tensor:
    """(H, N2) -> (H, N2, length): ``A_bar ** (start + l)`` for l < length (via exp(l log A))."""
    exps = torch.arange(start, start + length, device=A_bar.device, dtype=A_bar.real.dtype)
    # exp(l log A) = |A|^l (cos(l arg A) + i sin(l arg A)), in real arithmetic (torch's complex
    # exp is not vectorised on CPU)
    return torch.polar((A_bar.abs().log().unsqueeze(-1) * exps).exp(),
                       A_bar.angle().unsqueeze(-1) * exps)


def vandermonde(coef: torch.Tensor, A_bar: torch.Tensor, length: int,
                chunk_size: int = 64) -> torch.Tensor:
    """``2 Re(sum_n coef_n A_bar_n^l)`` for l < length: coef (..., H, N2) -> (..., H, length).

    Two levels, ``A^(c q + i) = (A^q)^c A^i``, so the work is one complex matmul
    (..., H, chunks, N2) @ (H, N2, q) instead of ``length`` powers per mode.
    """
    q = max(1, min(chunk_size, length))
    nc = -(-length // q)
    inner = powers(A_bar, q)                                            # (H, N2, q)
    outer = powers(A_bar ** q, nc).transpose(-1, -2)                    # (H, nc, N2)
    out = (coef.unsqueeze(-2) * outer) @ inner                          # (..., H, nc, q)
    return 2 * out.real.flatten(-2)[..., :length]


def s4d_kernel(A_bar, B_bar, C, length: int) -> torch.Tensor:
    """K_l = 2 Re(sum_n C_n B_bar_n A_bar_n^l), l < length: (H, length) real."""
    return vandermonde(C * B_bar, A_bar, length)


def s4d_fft(u, A_bar, B_bar, C, D, initial_state=None, lengths=None, chunk_size: int = 64):
    """FFT-convolution form, equal to ``s4d_reference``. Returns ``y`` and the final state.

    ``lengths`` (B,): row b's final state is the one after ``lengths[b]`` steps (its inputs after
    that must be zero, as a layer's padding is; outputs there are not defined).
    """
    x0 = _check(u, A_bar, B_bar, C, D, initial_state)
    b, h, t = u.shape
    if t == 0:
        return u.new_zeros(u.shape), x0
    # outputs: causal convolution by FFT, plus the initial state read out through A_bar^(t+1)
    K = s4d_kernel(A_bar, B_bar, C, t)
    n = 2 * t
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(K, n=n), n=n)[..., :t]
    y = y + D.unsqueeze(-1) * u
    y = y + vandermonde(x0 * C * A_bar, A_bar, t)
    # final state: right-align each row so that it ends at step t, then a chunked Vandermonde
    ends = (torch.full((b,), t, dtype=torch.long, device=u.device)
            if lengths is None else lengths)
    if lengths is not None:
        src = torch.arange(t, device=u.device).unsqueeze(0) - (t - ends).unsqueeze(1)
        u = torch.where((src >= 0).unsqueeze(1), u.gather(-1, src.clamp(min=0).unsqueeze(1).expand(-1, h, -1)),
                        torch.zeros((), dtype=u.dtype, device=u.device))
    q = max(1, min(chunk_size, t))
    nc = -(-t // q)
    uc = torch.nn.functional.pad(u, (nc * q - t, 0)).view(b, h, nc, q)   # zeros in front
    inner = powers(A_bar, q).flip(-1)                                   # A^(q-1-i)
    per_chunk = torch.einsum("bhci,hni->bhcn", uc.to(inner.dtype), inner * B_bar.unsqueeze(-1))
    outer = powers(A_bar ** q, nc).flip(-1)                             # A^(q (nc-1-c))
    x = torch.einsum("bhcn,hnc->bhn", per_chunk, outer)
    steps = ends.view(b, 1, 1).to(u.dtype)
    x = x + torch.polar((A_bar.abs().log() * steps).exp(), A_bar.angle() * steps) * x0
    return y, x
