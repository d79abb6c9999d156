"""Bytes as tokens: vocabulary of 256, text <-> UTF-8 bytes.

Any text (any language, any code) maps to tokens without an unknown token; decoding an arbitrary
token sequence, which may cut a multi-byte character, uses ``errors="replace"`` (U+FFFD).
"""

from __future__ import annotations

from collections.abc import Iterable


class ByteTokenizer:
    """``encode(text) -> list[int]`` (UTF-8 bytes) and ``decode(ids) -> str``."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> list[int]:
        if isinstance(text, str):
            return list(text.encode("utf-8"))
        if isinstance(text, (bytes, bytearray)):
            return list(text)
        raise ValueError(f"text must be str or bytes, got {type(text).__name__}")

    def decode(self, ids: Iterable[int]) -> str:
        if hasattr(ids, "tolist"):  # tensors and arrays
            ids = ids.tolist()
        ids = list(ids)
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < 256]
        if bad:
            raise ValueError(f"ids must be integers in [0, 255], got {bad[:5]!r}")
        return bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=256)"
