"""``x @ W`` for a few rows of ``x``, with the weight streamed from memory once (C++).

Decoding runs a language model on one token per step, and speculative decoding verifies a
handful at once: there ``x`` has a few rows and the product is bound by reading ``W``. BLAS
serves such shapes poorly on the CPU (on the 2-core machine, MKL's (8, 576) @ (576, 3072) takes
2.1x its single-row time, where reading the weight once costs the same for both);
``csrc/streamed_matmul.cpp`` reads the weight in row order, eight rows at a time, and updates
every output row from them.

Every output element is the same chain of fused multiply-adds over k = 0..K-1 whatever the
number of rows and however the columns are split among threads: a row's result is bitwise the
same computed alone or with others. A model's linear layers then give a token the same result
whether it is decoded alone (greedy) or verified among others (speculative decoding); with BLAS,
the two can differ in the last bits.

``serves(x, W)`` says whether a call qualifies: no gradient needed, CPU, float32/float64, at most
``MAX_ROWS`` rows, and the extension builds (``recurra.ops.chunked_scan_compiled.EXTENSION``; a
warning, once, if not).
"""

from __future__ import annotations

import torch

from . import chunked_scan_compiled

#: up to this many rows of x use the streamed product (beyond, BLAS's blocked kernels win)
MAX_ROWS = 16


def serves(x: torch.Tensor, W: torch.Tensor) -> bool:
    """Whether ``x @ W`` qualifies (see the module docstring)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (0 < rows <= MAX_ROWS and W.dim() == 2
            and chunked_scan_compiled.serves("auto", x, W))


def streamed_matmul(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``x @ W`` for ``x`` (..., K) and ``W`` (K, N) (see the module docstring)."""
    ext = chunked_scan_compiled.EXTENSION.load()
    out = ext.streamed_matmul(x.reshape(-1, x.shape[-1]).contiguous(), W.contiguous())
    return out.view(*x.shape[:-1], W.shape[1])


def matmul(x: torch.Tensor, W: torch.Tensor, streamed: bool) -> torch.Tensor:
    """``x @ W``, streamed when ``streamed`` (decided once per model call, by ``serves`` on one
    of its products: the check costs tens of microseconds, a product of a small model little
    more)."""
    return streamed_matmul(x, W) if streamed else x @ W
