"""Triton kernels for ParaRNN on GPUs: a diagonal linear scan and a fused ParaGRU Newton step.

Optional: ``triton`` is imported lazily (``available()`` says whether it can be used). On a CPU the
kernels run in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before the first call
(that is how the tests check them; it is slow and meant for testing only).

- :func:`linear_scan_triton` computes ``h_t = a_t h_{t-1} + b_t`` (diagonal, (B, T, D)): one
  program per (sequence, block of channels) walks over time in chunks of ``block_t`` steps, each
  chunk solved by ``tl.associative_scan`` and joined to the previous chunk by its carry.
- :func:`paragru_newton_step_triton` fuses one whole Newton iteration of the ParaGRU cell: the
  shifted previous state, the gates, the closed-form diagonal Jacobian, the right-hand side
  ``f - J h_prev`` and the scan, in one kernel, without materialising J. Channels of a diagonal
  cell never interact, so programs are independent.

Both are forward-only building blocks: :class:`recurra.ops.newton.NewtonSolver` (``backend=
"triton"``) uses the fused step for the iterations and keeps its implicit backward.
"""

from __future__ import annotations

import torch


def available() -> bool:
    """True when triton can be imported (kernels then need a GPU or ``TRITON_INTERPRET=1``)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check_device(*tensors: torch.Tensor) -> None:
    if not available():
        raise RuntimeError("the triton backend needs the `triton` package (pip install triton)")
    for t in tensors:
        if t.device.type != "cuda" and not _interpreting():
            raise ValueError(
                f"triton kernels need CUDA tensors (got a tensor on {t.device}); on a CPU set "
                "TRITON_INTERPRET=1 before the first call to run them in the interpreter")


def _kernels():
    """The kernels module (imported on first use: triton decides at definition time whether the
    kernels are interpreted, from TRITON_INTERPRET)."""
    from . import newton_triton_kernels as k

    return k.scan_kernel, k.paragru_step_kernel


def _blocks(steps: int, width: int, block_t: int | None, block_d: int | None):
    import triton

    block_d = block_d or min(64, triton.next_power_of_2(max(width, 1)))
    block_t = block_t or min(256, triton.next_power_of_2(max(steps, 1)))
    return block_t, block_d


def linear_scan_triton(a: torch.Tensor, b: torch.Tensor, initial_state: torch.Tensor | None = None,
                       block_t: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """Diagonal ``h_t = a_t h_{t-1} + b_t`` for (B, T, D) tensors (forward only)."""
    if a.shape != b.shape or b.dim() != 3:
        raise ValueError(f"a and b must both have shape (batch, time, channels), got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    batch, steps, width = b.shape
    if initial_state is None:
        initial_state = b.new_zeros(batch, width)
    if tuple(initial_state.shape) != (batch, width):
        raise ValueError(f"initial_state must have shape {(batch, width)}, got "
                         f"{tuple(initial_state.shape)}")
    _check_device(a, b, initial_state)
    import triton

    scan_kernel, _ = _kernels()
    a, b, h0 = a.contiguous(), b.contiguous(), initial_state.contiguous()
    out = torch.empty_like(b)
    if steps == 0:
        return out
    bt, bd = _blocks(steps, width, block_t, block_d)
    scan_kernel[(batch, triton.cdiv(width, bd))](a, b, h0, out, steps, width,
                                                 BLOCK_T=bt, BLOCK_D=bd)
    return out


def paragru_newton_step_triton(u: torch.Tensor, initial_state: torch.Tensor, h: torch.Tensor,
                               a_z: torch.Tensor, a_r: torch.Tensor, a_h: torch.Tensor,
                               mask: torch.Tensor | None = None, block_t: int | None = None,
                               block_d: int | None = None) -> torch.Tensor:
    """One fused Newton iteration of the ParaGRU cell from iterate ``h`` (B, T, D).

    ``u`` is (B, T, 3, D) (any strides), gates in the order z, r, h. Equals
    ``recurra.ops.newton.newton_step(ParaGRUCell, u, initial_state, h, mask)``.
    """
    batch, steps, width = h.shape
    if tuple(u.shape) != (batch, steps, 3, width):
        raise ValueError(f"u must have shape {(batch, steps, 3, width)}, got {tuple(u.shape)}")
    _check_device(u, initial_state, h)
    import triton

    _, step_kernel = _kernels()
    h = h.detach().contiguous()
    h0 = initial_state.detach().contiguous()
    u = u.detach()
    out = torch.empty_like(h)
    if steps == 0:
        return out
    bt, bd = _blocks(steps, width, block_t, block_d)
    mask_arg = mask.to(torch.int8).contiguous() if mask is not None else h  # unused if no mask
    step_kernel[(batch, triton.cdiv(width, bd))](
        u, u.stride(0), u.stride(1), u.stride(2), u.stride(3), h0, h, mask_arg,
        a_z.detach().contiguous(), a_r.detach().contiguous(), a_h.detach().contiguous(), out,
        steps, width, HAS_MASK=mask is not None, BLOCK_T=bt, BLOCK_D=bd)
    return out
