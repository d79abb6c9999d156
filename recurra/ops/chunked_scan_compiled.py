"""Inference fast path of the chunked scalar-decay scans, compiled in C++.

Mamba-2's SSD (``recurra.ops.ssd``) and causal linear attention (``recurra.ops.linear_attention``)
share one recurrence per head, ``S_t = a_t S_{t-1} + B_t^T x_t``, ``y_t = C_t S_t`` (linear
attention: ``a_t = 1``, ``B = phi(k)``, ``C = phi(q)``, ``x = v``, optionally divided by the
normaliser ``C_t . z_t``). ``csrc/chunked_scan.cpp`` computes its chunked form for inference in
one pass over the inputs: each (batch row, head) walks its chunks with the chunk's inputs in small
cache-resident tiles, the tasks run on torch's threads, and it can fold in what the layers would
otherwise do in extra passes over full-size tensors (Mamba-2's input scale ``dt`` and skip
``D x``; linear attention's feature map elu + 1).

It has no backward: ``serves(...)`` is true only when no gradient is needed (``torch.no_grad``,
or no input requires grad), on the CPU, in float32 or float64. The layers call it then with
``backend="auto"`` (their default) and run the torch ops otherwise; the tests hold both to the
reference loops. The extension is built on first use (see ``recurra.ops.cpp_extension``); when
it cannot be built, ``backend="auto"`` warns once (``CompiledScanWarning``) and runs the torch
ops, which compute the same numbers more slowly.

The same extension (``EXTENSION``, "recurra_inference_kernels") also holds Mamba-2's one-pass
conv + SiLU and gated RMSNorm (``causal_conv_silu``, ``gated_rms_norm`` below,
``csrc/mamba2_pointwise.cpp``), the few-row product of ``recurra.ops.streamed_matmul`` and the
Llama decoder's few-token forward of ``recurra.ops.llama_decode``, the few-row top-k of
``recurra.ops.top_k`` and the KV-cache commit of ``recurra.ops.kv_keep``; all of them are
forward-only and share ``serves``.
"""

from __future__ import annotations

import warnings

import torch

from .cpp_extension import CompiledExtension

EXTENSION = CompiledExtension(
    "recurra_inference_kernels", ("inference_kernels.cpp", "chunked_scan.cpp",
                                  "mamba2_pointwise.cpp", "streamed_matmul.cpp",
                                  "llama_decode.cpp", "top_k.cpp", "kv_keep.cpp"),
    "inference kernels", openmp=True)
BACKENDS = ("auto", "torch")


class CompiledScanWarning(UserWarning):
    """backend="auto" could not build the compiled scan and runs the torch ops instead."""


_warned = False


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def serves(backend: str, *tensors: torch.Tensor | None) -> bool:
    """Whether ``backend`` runs the compiled scan for these inputs: "auto", no gradient needed,
    all on the CPU in float32/float64, and the extension builds (a warning, once, if not)."""
    global _warned
    present = [t for t in tensors if t is not None]
    if backend != "auto" or not present:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in present):
        return False
    if any(t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64)
           or t.dtype != present[0].dtype for t in present):
        return False
    if EXTENSION.available():
        return True
    if not _warned:
        _warned = True
        warnings.warn(f"recurra: {EXTENSION.unavailable_reason()}. backend='auto' runs the "
                      "torch ops for inference instead (the same numbers, slower); pass "
                      "backend='torch' to choose them explicitly.", CompiledScanWarning,
                      stacklevel=3)
    return False


def ssd_forward(x, log_a, B, C, initial_state, chunk_size: int, x_scale=None, D=None):
    """``recurra.ops.ssd.ssd_chunked(x * x_scale[..., None], log_a, B, C, initial_state)``
    (shapes as there; ``x_scale`` (b, T, H) or None), plus ``D[h] * x`` when ``D`` (H,) is given.
    Returns ``y`` (b, T, H, P) and the final state (b, H, P, N)."""
    ext = EXTENSION.load()
    b, _, h, p = x.shape
    n = B.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(b, h, p, n)
    y, state = ext.chunked_scan_forward(x, log_a, x_scale, B, C, D, initial_state, None,
                                        chunk_size, False, 0.0)
    return y, state


def linear_attention_forward(q, k, v, initial_state, normalize: bool, eps: float,
                             chunk_size: int, elu: bool):
    """``recurra.ops.linear_attention.linear_attention_chunked`` on head-first (B, H, T, .)
    inputs (any strides with a unit last one), with ``elu`` applying the feature map elu + 1 to
    ``q`` and ``k`` as they are read. Returns ``y`` (B, H, T, Dv) (a transposed view of a
    (B, T, H, Dv) tensor: merging the heads after it is free) and the final state."""
    ext = EXTENSION.load()
    b, h, _, f = q.shape
    dv = v.shape[-1]
    if initial_state is None:
        S0 = q.new_zeros(b, h, f, dv)
        z0 = q.new_zeros(b, h, f) if normalize else None
    else:
        S0, z0 = initial_state[0], (initial_state[1] if normalize else None)
    # the kernel's state is (P x N) = (Dv x F) per head: linear attention's S is (F x Dv)
    out = ext.chunked_scan_forward(v.transpose(1, 2), None, None, k.transpose(1, 2),
                                   q.transpose(1, 2), None, S0.transpose(-1, -2), z0,
                                   chunk_size, elu, eps)
    y, S = out[0].transpose(1, 2), out[1].transpose(-1, -2)
    return y, ((S, out[2]) if normalize else (S,))


def causal_conv_silu(u, conv_state, weight, bias, lengths=None):
    """Mamba-2's ``silu(causal depthwise conv)`` over ``u`` (b, T, C) continuing ``conv_state``
    (b, k-1, C), and the new conv state (each row's last k-1 inputs, at ``lengths`` if given)."""
    return tuple(EXTENSION.load().causal_conv_silu(u, conv_state, weight, bias, lengths))


def gated_rms_norm(y, z, weight, eps: float):
    """``F.rms_norm(y * silu(z), (D,), weight, eps)`` in one pass (y, z of shape (b, T, D))."""
    return EXTENSION.load().gated_rms_norm(y, z, weight, eps)
