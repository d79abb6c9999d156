"""JRT-Prompt ("Just read twice", Arora et al., arXiv 2407.05483).

A recurrent model reads its context once, in order, with a fixed-size state: it cannot know
while reading which facts the question will ask for. Repeating the context before the question
lets the second read use everything seen in the first. :func:`jrt_prompt` builds that prompt,
for text or for token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T", str, list)


def jrt_prompt(context, question=None, repeats: int = 2, separator=None):
    """``context (separator context) * (repeats - 1) separator question``.

    ``context`` / ``question`` are strings (``separator`` default ``"\\n\\n"``) or token id
    sequences (``separator`` default none); ``question=None`` repeats the context only."""
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats!r}")
    if isinstance(context, str):
        if question is not None and not isinstance(question, str):
            raise ValueError("question must be a string like context")
        sep = "\n\n" if separator is None else separator
        parts = [context] * repeats + ([question] if question is not None else [])
        return sep.join(parts)
    if not isinstance(context, Sequence):
        raise ValueError(f"context must be a string or a sequence of token ids, got "
                         f"{type(context).__name__}")
    sep = list(separator) if separator is not None else []
    out: list = []
    for i in range(repeats):
        if i:
            out += sep
        out += list(context)
    if question is not None:
        out += sep + list(question)
    return out
