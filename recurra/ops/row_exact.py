"""Row-exact inference: every row of a batch computed bitwise as if it were alone.

Speculative decoding verifies several tokens at once (a draft tree's root-to-leaf paths as batch
rows, in one forward) and accepts a token only where the model's output equals what greedy
decoding, one token per ``step``, computes. The guarantee that the two outputs are identical
holds only if the forward gives every row exactly the bits that ``step`` gives it. BLAS does not
promise that: its kernels, and so their summation order, change with the number of rows (on the
2-core machine a (1, 128) and an (8, 128) product against the same weight differ in the last
bits).

So the layers that support it run their inference products through
:func:`recurra.ops.streamed_matmul.streamed_matmul`, where every output element is one chain of
fused multiply-adds over k whatever the number of rows and threads, and keep their pointwise math
row by row (the same code for every row). This module holds the rule they share
(:func:`applies`) and the linear layer's product (:func:`linear`).

The rule (:func:`applies`): no gradient needed, on the CPU, float32/float64, at most
``EXACT_ROWS`` rows in the call (batch x time), and the compiled kernels build here. Training
(gradients on), other devices and larger calls (a long prefill, an evaluation batch) run BLAS:
the same function to rounding. A call that qualifies and one that does not may differ in the last
bits; decoding only ever compares calls that qualify (a step, a verified tree, a replayed path).
:func:`available` says whether the kernels build (a warning, once, if not).

Supported: ``StackedRNN`` cells (LSTM, GRU, Elman, sLSTM, every head count; the recurrent product
per step in ``csrc/recurrent_cells.cpp``) and ``RecurrentLM``'s MLP and output head; the
embedding, RMSNorm, GELU and the residual adds are row-wise already (checked by the tests).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import chunked_scan_compiled, recurrent_compiled
from .streamed_matmul import packed

#: calls with at most this many rows (batch x time) run row-exact under no_grad
EXACT_ROWS = 256


def available() -> bool:
    """Whether the row-exact kernels can serve here: the inference kernels and the compiled
    recurrent loops both build (each warns once if not, through the ``auto`` backends)."""
    return chunked_scan_compiled.EXTENSION.available() and recurrent_compiled.available()


def applies(x: torch.Tensor, rows: int) -> bool:
    """Whether a call on ``x`` with ``rows`` rows runs row-exact (the module docstring's rule)."""
    return (not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float64) and 0 < rows <= EXACT_ROWS
            and available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; row-exact when :func:`applies` to ``x``'s rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not applies(x, rows) or weight.dtype != x.dtype:
        return F.linear(x, weight, bias)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x (..., {weight.shape[1]}) expected for a weight of shape "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    ext = chunked_scan_compiled.EXTENSION.load()
    out = ext.streamed_matmul(x.reshape(rows, -1).contiguous(), packed(weight, transposed=True),
                              weight.shape[0])
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


__all__ = ["EXACT_ROWS", "applies", "available", "linear"]
