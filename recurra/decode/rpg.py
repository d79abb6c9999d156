"""RPG-style grammar-based repetition penalisation for Python code (after Dong et al., "Rethinking
Repetition Problems of LLMs in Code Generation", arXiv 2505.10402).

Code degenerates *structurally*: ``a = 1 / b = 2 / c = 3 / ...`` repeats a grammar pattern even
though no token n-gram repeats. The processor therefore looks at the token stream's grammar, not
its tokens:

1. the generated tokens are decoded to text and lexed with Python's :mod:`tokenize` (tolerating
   an unfinished tail); each lexeme becomes a grammar symbol — keywords and operators stand for
   themselves, names become ``NAME``, literals ``NUMBER`` / ``STRING``, plus ``NEWLINE``,
   ``INDENT``, ``DEDENT``;
2. structural repetition = the symbol sequence ends with at least ``min_repeats`` consecutive
   copies of a unit of ``min_period``..``max_period`` symbols (the shortest such unit wins);
3. the *critical tokens* are the model tokens that began the next symbol at the same phase in the
   earlier copies: emitting them would continue the repetition. Their scores are lowered by
   ``strength x (copies - min_repeats + 1)``: the likelihood decays geometrically with every
   further repetition.

The processor is not lossless by design (it changes the distribution); in speculative decoding it
runs per draft node with that node's own history, so speculative output equals plain output.
"""

from __future__ import annotations

import io
import keyword
import tokenize
from collections.abc import Callable, Sequence

import torch

from .processors import LogitsProcessor

_SYMBOL_OF_TYPE = {tokenize.NUMBER: "NUMBER", tokenize.STRING: "STRING",
                   tokenize.NEWLINE: "NEWLINE", tokenize.NL: "NEWLINE",
                   tokenize.INDENT: "INDENT", tokenize.DEDENT: "DEDENT"}


def grammar_symbols(text: str) -> list[tuple[str, int]]:
    """(symbol, character offset) for every lexeme of ``text`` (comments skipped)."""
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (tokenize.COMMENT, tokenize.ENDMARKER):
                continue
            row, col = tok.start
            offset = line_starts[row - 1] + col if row - 1 < len(line_starts) else len(text)
            if tok.type == tokenize.NAME:
                sym = tok.string if keyword.iskeyword(tok.string) else "NAME"
            elif tok.type == tokenize.OP:
                sym = tok.string
            elif tok.type in _SYMBOL_OF_TYPE:
                if tok.type in (tokenize.DEDENT, tokenize.NEWLINE, tokenize.NL) and \
                        offset >= len(text):
                    continue  # synthesised at end of input
                sym = _SYMBOL_OF_TYPE[tok.type]
            else:
                continue
            out.append((sym, offset))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass  # an unfinished tail (open bracket or string): keep what was lexed
    return out


def tandem_repeat(symbols: Sequence[str], min_period: int, max_period: int,
                  min_repeats: int) -> tuple[int, int] | None:
    """(period, copies) of the shortest unit the sequence ends with >= min_repeats times."""
    n = len(symbols)
    for p in range(min_period, min(max_period, n // min_repeats) + 1):
        copies = 1
        while n - (copies + 1) * p >= 0 and \
                list(symbols[n - (copies + 1) * p:n - copies * p]) == list(symbols[n - p:]):
            copies += 1
        if copies >= min_repeats:
            return p, copies
    return None


class GrammarRepetitionPenalty(LogitsProcessor):
    """See the module docstring. ``decode(list_of_ids) -> str`` is the tokenizer's decoder."""

    def __init__(self, decode: Callable[[list[int]], str], strength: float = 2.0,
                 min_repeats: int = 3, min_period: int = 3, max_period: int = 40,
                 include_prompt: bool = False):
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if min_repeats < 2 or min_period < 1 or max_period < min_period:
            raise ValueError("need min_repeats >= 2 and 1 <= min_period <= max_period")
        self.decode = decode
        self.strength, self.min_repeats = float(strength), min_repeats
        self.min_period, self.max_period = min_period, max_period
        self.include_prompt = include_prompt
        self.prompt_length = 0
        self._pieces: dict[int, str] = {}

    def start(self, prompt_length: int) -> None:
        self.prompt_length = 0 if self.include_prompt else prompt_length

    def _piece(self, token: int) -> str:
        if token not in self._pieces:
            self._pieces[token] = self.decode([token])
        return self._pieces[token]

    def critical_tokens(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """(token ids that would continue a structural repetition, number of copies)."""
        pieces = [self._piece(int(t)) for t in tokens]
        starts, text = [], ""
        for piece in pieces:
            starts.append(len(text))
            text += piece
        symbols = grammar_symbols(text)
        found = tandem_repeat([s for s, _ in symbols], self.min_period, self.max_period,
                              self.min_repeats)
        if found is None:
            return [], 0
        period, copies = found
        n = len(symbols)
        critical = []
        for j in range(1, copies + 1):
            offset = symbols[n - j * period][1]  # the symbol that followed an earlier copy
            # the model token whose text covers that offset
            k = max(i for i, s in enumerate(starts) if s <= offset)
            critical.append(int(tokens[k]))
        return sorted(set(critical)), copies

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            tokens = input_ids[row, self.prompt_length:].tolist()
            critical, copies = self.critical_tokens(tokens)
            if critical:
                scores[row, critical] -= self.strength * (copies - self.min_repeats + 1)
        return scores
