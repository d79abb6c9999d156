"""GRU (torch.nn.GRU's equations and gate order r, z, n), with optional heads."""

from __future__ import annotations

from .lstm import _hidden
from .recurrent_stack import StackedRNN
from .registry import register

__all__ = ["GRU"]


class GRU(StackedRNN):
    """Like torch.nn.GRU (batch_first=True by default), plus ``num_heads``, ``lengths`` and
    ``step``. State: (h,), h of shape (num_layers * directions, B, H)."""

    cell = "gru"


@register("gru", "GRU (torch.nn.GRU semantics; heads = block-diagonal recurrence)")
def _build(d_model: int, bidirectional: bool = False, **options) -> GRU:
    return GRU(d_model, _hidden(d_model, bidirectional), bidirectional=bidirectional, **options)
