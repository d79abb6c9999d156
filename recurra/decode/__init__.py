"""Generation: one entry point (:func:`generate` / :func:`stream`) over a small decoding protocol
(:mod:`recurra.decode.protocol`) with adapters for recurrent models, KV-cache transformers and
transformers causal LMs; strategies (greedy, sampling, beam, diverse and conditional beam),
logits processors, and lossless train-free speculative decoding. See docs/decoding.md."""

from .generate import DecodeOptions, GenerateOutput, drafter_for, generate, stream
from .protocol import DecodeAdapter, DecodeSession, as_adapter
from .speculative import Drafter
from .stats import DecodeStats
from .tree import DraftTree, TreeTemplate

__all__ = [
    "DecodeAdapter",
    "DecodeOptions",
    "DecodeSession",
    "DecodeStats",
    "DraftTree",
    "Drafter",
    "GenerateOutput",
    "TreeTemplate",
    "as_adapter",
    "drafter_for",
    "generate",
    "stream",
]
