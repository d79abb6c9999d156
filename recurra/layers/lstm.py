"""LSTM (torch.nn.LSTM's equations and gate order i, f, g, o), with optional heads."""

from __future__ import annotations

from .recurrent_stack import StackedRNN, from_torch
from .registry import register

__all__ = ["LSTM", "from_torch"]


class LSTM(StackedRNN):
    """Like torch.nn.LSTM (batch_first=True by default), plus ``num_heads`` (block-diagonal
    recurrence), ``lengths`` and ``step``. State: (h, c), each (num_layers * directions, B, H)."""

    cell = "lstm"


@register("lstm", "LSTM (torch.nn.LSTM semantics; heads = block-diagonal recurrence, FlashRNN)")
def _build(d_model: int, bidirectional: bool = False, **options) -> LSTM:
    return LSTM(d_model, _hidden(d_model, bidirectional), bidirectional=bidirectional, **options)


def _hidden(d_model: int, bidirectional: bool) -> int:
    if bidirectional and d_model % 2:
        raise ValueError(f"a bidirectional layer needs an even d_model, got {d_model}")
    return d_model // 2 if bidirectional else d_model
