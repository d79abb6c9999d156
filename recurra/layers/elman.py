"""Elman RNN (torch.nn.RNN: h' = tanh or relu(W x + b_ih + R h + b_hh)), with optional heads."""

from __future__ import annotations

from .lstm import _hidden
from .recurrent_stack import StackedRNN
from .registry import register

__all__ = ["RNN"]


class RNN(StackedRNN):
    """Like torch.nn.RNN (batch_first=True by default; ``nonlinearity`` "tanh" or "relu"), plus
    ``num_heads``, ``lengths`` and ``step``. State: (h,)."""

    cell = "elman"


@register("elman", "Elman RNN, tanh or relu (torch.nn.RNN semantics; heads)")
def _build(d_model: int, bidirectional: bool = False, **options) -> RNN:
    return RNN(d_model, _hidden(d_model, bidirectional), bidirectional=bidirectional, **options)
