"""``x @ W`` for a few rows of ``x``, with the weight streamed from memory once (C++).

Decoding runs a language model on one token per step, and speculative decoding verifies a
handful at once: there ``x`` has a few rows and the product is bound by reading ``W``. BLAS
serves such shapes poorly on the CPU: on the 2-core machine, MKL's (8, 576) @ (576, 49152) takes
2.3x its single-row time, where reading the weight once costs the same for both.
The kernel (``csrc/panel_gemm.h``, bound in ``csrc/streamed_matmul.cpp``) reads ``W`` packed in
column panels (:func:`pack_panels`: 32 columns, every k, contiguous), one sequential read per
panel, with the output rows' accumulators in registers for all of K and software prefetches
6 KB ahead into L2 and 1 KB ahead into L1. Rows of ``x`` then cost little beyond the first: in
per-shape timings on the 2-core machine (2026-11-27, SmolLM2's shapes, weights too large for
the cache), 8 rows read the weight at 75-90% of the single-row rate, where the earlier
row-order kernel managed 50-60%.

The packed copy of a weight is made on first use and kept (one copy per weight tensor, weakly
keyed: it goes with the weight) until the weight's data changes (its version or storage), so a
model that streams its products holds its weights twice.

Every output element is the same chain of fused multiply-adds over k = 0..K-1 whatever the
number of rows and threads: a row's result is bitwise the same computed alone or with others.
A model's linear layers then give a token the same result whether it is decoded alone (greedy)
or verified among others (speculative decoding); with BLAS, the two can differ in the last bits.

``serves(x, W)`` says whether a call qualifies: no gradient needed, CPU, float32/float64, at most
``MAX_ROWS`` rows, and the extension builds (``recurra.ops.chunked_scan_compiled.EXTENSION``; a
warning, once, if not).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import chunked_scan_compiled

#: up to this many rows of x qualify (the rows of a decoding step, a draft tree, a few beams;
#: larger products are BLAS's blocked kernels' to serve)
MAX_ROWS = 32
#: columns per packed panel (csrc/streamed_matmul.cpp's kPanel)
PANEL = 32


def serves(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether ``x @ W`` qualifies (see the module docstring)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (0 < rows <= MAX_ROWS and W.dim() == 2
            and chunked_scan_compiled.serves("auto", x, W))


def pack_panels(W: torch.Tensor) -> torch.Tensor:
    """``W`` (K, N) as (P, K, PANEL) column panels, P = ceil(N / PANEL), the last zero-padded."""
    if W.dim() != 2:
        raise ValueError(f"W must be (K, N), got shape {tuple(W.shape)}")
    K, N = W.shape
    P = -(-N // PANEL)
    padded = torch.nn.functional.pad(W.detach(), (0, P * PANEL - N))
    return padded.reshape(K, P, PANEL).transpose(0, 1).contiguous()


#: packed weights: W -> {transposed: ((version, data_ptr, shape, dtype), panels)}
_PACKED = WeakIdKeyDictionary()


def packed(W: torch.Tensor, transposed: bool = False) -> torch.Tensor:
    """``pack_panels(W)``, or ``pack_panels(W.T)`` with ``transposed`` (an (out, in) weight as
    ``nn.Linear`` keeps it), cached while ``W``'s data is unchanged (module docstring)."""
    key = (W._version, W.data_ptr(), W.shape, W.dtype)
    entries = _PACKED.setdefault(W, {})
    entry = entries.get(transposed)
    if entry is None or entry[0] != key:
        entry = (key, pack_panels(W.detach().t() if transposed else W))
        entries[transposed] = entry
    return entry[1]


def streamed_matmul(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``x @ W`` for ``x`` (..., K) and ``W`` (K, N) (see the module docstring)."""
    if x.shape[-1] != W.shape[0]:
        raise ValueError(f"x (..., K) and W (K, N) must share K, got {tuple(x.shape)} and "
                         f"{tuple(W.shape)}")
    ext = chunked_scan_compiled.EXTENSION.load()
    out = ext.streamed_matmul(x.reshape(-1, x.shape[-1]).contiguous(), packed(W), W.shape[1])
    return out.view(*x.shape[:-1], W.shape[1])

