"""The Llama decoder's forward for inference calls of a few tokens, compiled in C++.

A decoding step runs the model on one token and a speculative verify on a handful; at those
sizes a torch forward of a small model spends as long dispatching its ~30 small ops per layer
as it does reading the weights (SmolLM2-135M on the 2-core CPU: about 12 of 35 ms per token).
``csrc/llama_decode.cpp`` runs every layer, the final norm and the output head in one call:
RMSNorm, the fused q/k/v product, rotary embedding, the KV-cache append, attention, the output
product, the gated MLP; the products through the panel kernel of
:mod:`recurra.ops.streamed_matmul` on packed copies of the weights (:func:`packed`).

It computes :class:`recurra.models.llama.LlamaLM`'s torch forward (the reference; the tests
hold the two together in float64 and float32) and adds one guarantee the torch forward does
not give: **a row's results do not depend on the other rows**. The products' rows are
independent (see streamed_matmul), and a query attends to exactly the keys its mask allows, in
slot order, skipping the others rather than weighting them by zero. A token's logits are then
bitwise the same decoded alone (greedy) or verified anywhere inside a draft tree, so
speculative decoding through this path is lossless bit for bit, not just up to rounding.

The packed copies (:func:`pack_weights`) double the weights' memory; a model keeps them while its
weights are unchanged (LlamaLM checks every weight's version and storage per call).

``serves(x)`` says whether a call qualifies: no gradient needed, CPU, float32/float64, at most
``MAX_ROWS`` rows (batch x tokens), and the extension builds (a warning, once, if not). Forward
only: training runs the torch forward. Short prefills qualify too: the panel kernel takes any
number of rows (14 at a time per pass over a panel), and up to 128 rows it is never slower
than the torch forward (SmolLM2 on the 2-core machine, 2026-11-27, prefill of n tokens,
compiled against torch: n = 49: 59 against 88 ms; 64: 103 against 128; 96: 154 against 171;
128: 214 against 214).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import chunked_scan_compiled
from .streamed_matmul import packed

#: calls of up to this many rows (batch x tokens) run compiled: decoding steps, draft trees,
#: beams and short prefills (module docstring); longer ones run the torch forward
MAX_ROWS = 128


def serves(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether the call with embedded tokens ``x`` (B, T, D) qualifies (module docstring): at
    most ``MAX_ROWS`` rows; a longer prefill runs the torch forward."""
    rows = x.shape[0] * x.shape[1]
    return 0 < rows <= MAX_ROWS and chunked_scan_compiled.serves("auto", x, *weights)


class PackedLlama(NamedTuple):
    """A decoder's weights as the compiled forward reads them (:func:`pack_weights`)."""

    weights: list          # per layer: norm_attn, qkv panels, out panels, norm_mlp, gate_up, down
    norm: torch.Tensor     # the final norm's weight (D,)
    head: torch.Tensor     # the output head's panels
    vocab_size: int
    intermediate_size: int


def pack_weights(layers: Sequence[Sequence[torch.Tensor]], norm: torch.Tensor,
                 head: torch.Tensor) -> PackedLlama:
    """``layers``: per layer ``(norm_attn, qkv, out, norm_mlp, gate_up, down)``, the products
    input-major (``y = x @ W``, as in LlamaLM); ``head`` (D, vocab). The products are packed in
    column panels (:func:`recurra.ops.streamed_matmul.packed`, cached per weight)."""
    weights = []
    for norm_attn, qkv, out, norm_mlp, gate_up, down in layers:
        weights += [norm_attn.detach(), packed(qkv), packed(out), norm_mlp.detach(),
                    packed(gate_up), packed(down)]
    return PackedLlama(weights, norm.detach(), packed(head), head.shape[1],
                       layers[0][5].shape[0])


@torch.no_grad()
def llama_decode(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 mask: torch.Tensor | None, cache: Sequence[tuple[torch.Tensor, torch.Tensor]],
                 weights: PackedLlama, n_heads: int, n_kv_heads: int, eps: float,
                 logits_to_keep: int = 0, return_hidden: bool = False):
    """One forward of the decoder over ``x`` (B, T, D) (the embedded tokens).

    ``cos``/``sin`` (B, T, head_dim): the rotary tables at the tokens' positions; ``mask``: bool
    (B or 1, T, S + T) or None (causal); ``cache``: per layer ``(k, v)`` (B, n_kv_heads, S,
    head_dim) or empty; ``weights``: :func:`pack_weights`. Returns ``logits`` (B, T or
    logits_to_keep, vocab), the new cache and, with ``return_hidden``, the final-norm hidden
    states (B, T, D)."""
    ext = chunked_scan_compiled.EXTENSION.load()
    flat = [t for kv in cache for t in kv] if cache else []
    result = ext.llama_decode(
        x.contiguous(), cos.contiguous(), sin.contiguous(),
        None if mask is None else mask.contiguous(), flat, weights.weights, weights.norm,
        weights.head, weights.vocab_size, n_heads, n_kv_heads, cos.shape[-1],
        weights.intermediate_size, eps, logits_to_keep, return_hidden)
    logits, hidden, kv = result[0], result[1], result[2:]
    n_layers = len(weights.weights) // 6
    new_cache = tuple((kv[2 * i], kv[2 * i + 1]) for i in range(n_layers))
    return (logits, new_cache, hidden) if return_hidden else (logits, new_cache)
