"""sLSTM (xLSTM / FlashRNN): exponential input gate with a max stabiliser, normaliser state.

Gates (i~, f~, z~, o~) = W x + R h + b, R block-diagonal over heads; state (h, c, n, m):
m' = max(i~, log sigmoid(f~) + m), i = exp(i~ - m'), f = exp(log sigmoid(f~) + m - m'),
c' = f c + i tanh(z~), n' = f n + i, h' = sigmoid(o~) c' / n'.
The empty state is all zeros (n' > 0 from the first step on). The stabiliser m changes c and n
together and leaves h unchanged.
"""

from __future__ import annotations

import torch

from .lstm import _hidden
from .recurrent_stack import StackedRNN
from .registry import register

__all__ = ["SLSTM"]


class SLSTM(StackedRNN):
    """sLSTM layer with torch.nn.LSTM-style arguments (gate order i, f, z, o) and ``num_heads``.

    ``forget_bias`` (default 3.0) is added to the forget gate's input bias at initialisation,
    so a fresh layer remembers over tens of steps.
    """

    cell = "slstm"

    def __init__(self, input_size, hidden_size, *args, forget_bias: float = 3.0, **kwargs):
        self.forget_bias = forget_bias
        super().__init__(input_size, hidden_size, *args, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias:
            H = self.hidden_size
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.startswith("bias_ih"):
                        p[H:2 * H] += self.forget_bias


@register("slstm", "sLSTM (xLSTM/FlashRNN): exponential gating, normaliser and stabiliser; heads")
def _build(d_model: int, bidirectional: bool = False, num_heads: int = 4, **options) -> SLSTM:
    return SLSTM(d_model, _hidden(d_model, bidirectional), bidirectional=bidirectional,
                 num_heads=num_heads, **options)
