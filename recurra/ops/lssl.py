"""Linear state space layer (LSSL; Gu et al. 2021): a dense HiPPO state matrix, discretised,
as a convolution (parallel) and as a recurrence (step).

Per channel h: ``x_t = A_bar x_{t-1} + B_bar u_t``, ``y_t = C x_t + D u_t`` with a dense N x N
``A_bar`` (from HiPPO-LegS, ``recurra.ops.s4d.hippo_legs``) and real N-dimensional states.
Discretisations as for S4D: ``"bilinear"`` (the LSSL paper's) and ``"zoh"`` (matrix exponential).

Parallel form: the Krylov matrix ``[B_bar, A_bar B_bar, ..., A_bar^(T-1) B_bar]`` by repeated
squaring (log2 T matmuls), the kernel ``K_l = C A_bar^l B_bar``, the causal convolution by FFT.

Shapes: ``u`` (B, H, T); ``A_bar`` (H, N, N); ``B_bar``, ``C`` (H, N); ``D`` (H,); state (B, H, N).
"""

from __future__ import annotations

import torch

DISCRETIZATIONS = ("bilinear", "zoh")


def discretize_dense(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor, method: str):
    """``(A_bar (H, N, N), B_bar (H, N))`` for continuous ``A`` (N, N), ``B`` (N,), ``dt`` (H,)."""
    if method not in DISCRETIZATIONS:
        raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, got {method!r}")
    n = A.shape[0]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    dA = dt.view(-1, 1, 1) * A                                          # (H, N, N)
    if method == "bilinear":
        left = eye - dA / 2
        A_bar = torch.linalg.solve(left, eye + dA / 2)
        B_bar = torch.linalg.solve(left, dt.view(-1, 1) * B)
        return A_bar, B_bar
    A_bar = torch.linalg.matrix_exp(dA)
    B_bar = torch.linalg.solve(A.expand_as(dA), ((A_bar - eye) @ B.unsqueeze(-1))).squeeze(-1)
    return A_bar, B_bar


def krylov(A_bar: torch.Tensor, b: torch.Tensor, length: int) -> torch.Tensor:
    """``[b, A b, A^2 b, ...]`` (length columns): (H, N, N), (H, N) -> (H, N, length)."""
    out = b.unsqueeze(-1)
    power = A_bar
    while out.shape[-1] < length:
        out = torch.cat([out, power @ out], -1)
        power = power @ power
    return out[..., :length]


def lssl_reference(u, A_bar, B_bar, C, D, initial_state=None):
    """The recurrence, one step at a time. Returns ``y`` (B, H, T) and the final state."""
    b, h, _ = u.shape
    x = u.new_zeros(b, h, A_bar.shape[-1]) if initial_state is None else initial_state
    ys = []
    for t in range(u.shape[-1]):
        x = (A_bar @ x.unsqueeze(-1)).squeeze(-1) + B_bar * u[:, :, t:t + 1]
        ys.append((C * x).sum(-1) + D * u[:, :, t])
    return (torch.stack(ys, -1) if ys else u.new_zeros(u.shape)), x


def lssl_conv(u, A_bar, B_bar, C, D, initial_state=None, lengths=None):
    """Convolution form, equal to ``lssl_reference``; ``lengths`` as in ``s4d_fft``."""
    b, h, t = u.shape
    n = A_bar.shape[-1]
    x0 = u.new_zeros(b, h, n) if initial_state is None else initial_state
    if t == 0:
        return u.new_zeros(u.shape), x0
    kry = krylov(A_bar, B_bar, t)                                       # (H, N, T)
    K = torch.einsum("hn,hnl->hl", C, kry)
    y = torch.fft.irfft(torch.fft.rfft(u, n=2 * t) * torch.fft.rfft(K, n=2 * t), n=2 * t)
    y = y[..., :t] + D.unsqueeze(-1) * u
    # initial state read out: C A_bar^(t+1) x0, by the Krylov matrix of A_bar^T from A_bar^T C
    obs = krylov(A_bar.transpose(-1, -2), (A_bar.transpose(-1, -2) @ C.unsqueeze(-1))[..., 0], t)
    y = y + torch.einsum("hnl,bhn->bhl", obs, x0)
    # final state: right-align rows at their lengths, contract with the reversed Krylov matrix
    ends = torch.full((b,), t, dtype=torch.long, device=u.device) if lengths is None else lengths
    if lengths is not None:
        src = torch.arange(t, device=u.device).unsqueeze(0) - (t - ends).unsqueeze(1)
        u = torch.where((src >= 0).unsqueeze(1),
                        u.gather(-1, src.clamp(min=0).unsqueeze(1).expand(-1, h, -1)),
                        torch.zeros((), dtype=u.dtype, device=u.device))
    x = torch.einsum("bhl,hnl->bhn", u, kry.flip(-1))
    carried = []
    for i in range(b):  # A_bar^(length) x0 per row
        power = torch.linalg.matrix_power(A_bar, int(ends[i]))
        carried.append((power @ x0[i].unsqueeze(-1)).squeeze(-1))
    return y, x + torch.stack(carried)
