"""ParaLSTM: LSTM-CIFG with diagonal recurrences and peepholes (ParaRNN form).

Per channel, with u = (u_f, u_c, u_o) the input projections of x_t and state (c, h)::

    f  = sigmoid(a_f h + u_f + p_f c)
    c~ = tanh(a_c h + u_c)
    c' = f c + (1 - f) c~                      (coupled input and forget gates)
    o  = sigmoid(a_o h + u_o + p_o c')
    h' = o tanh(c')

The Jacobian d(c', h')/d(c, h) is a 2 x 2 block per channel (closed form below).
State: ``(c, h)``, each (B, d_model); output y_t = h_t. Internally the state is (B, D, 2) = [c, h].
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.newton import NewtonCell
from ._pararnn import ParaRNNLayer
from .registry import register


class ParaLSTMCell(NewtonCell):
    """The ParaLSTM recurrence on u (..., 3, D) and state (..., D, 2) = [c, h]."""

    structure = "block"

    def __init__(self, d_model: int, std: float):
        super().__init__()
        for name in ("a_f", "a_c", "a_o", "p_f", "p_o"):
            setattr(self, name, nn.Parameter(std * torch.randn(d_model)))

    def _forward(self, u, s):
        u_f, u_c, u_o = u.unbind(-2)
        c, h = s.unbind(-1)
        f = torch.sigmoid(self.a_f * h + u_f + self.p_f * c)
        cand = torch.tanh(self.a_c * h + u_c)
        c_new = f * c + (1 - f) * cand
        o = torch.sigmoid(self.a_o * h + u_o + self.p_o * c_new)
        tc = torch.tanh(c_new)
        return c, f, cand, c_new, o, tc

    def step(self, u, s):
        _, _, _, c_new, o, tc = self._forward(u, s)
        return torch.stack([c_new, o * tc], -1)

    def step_and_jacobian(self, u, s):
        c, f, cand, c_new, o, tc = self._forward(u, s)
        df = f * (1 - f)
        # c' = f c + (1 - f) c~
        dc_dc = f + (c - cand) * df * self.p_f
        dc_dh = (c - cand) * df * self.a_f + (1 - f) * (1 - cand * cand) * self.a_c
        # o = sigmoid(a_o h + u_o + p_o c'), h' = o tanh(c')
        do = o * (1 - o)
        do_dc = do * self.p_o * dc_dc
        do_dh = do * (self.a_o + self.p_o * dc_dh)
        dt = o * (1 - tc * tc)
        dh_dc = do_dc * tc + dt * dc_dc
        dh_dh = do_dh * tc + dt * dc_dh
        jac = torch.stack([torch.stack([dc_dc, dc_dh], -1), torch.stack([dh_dc, dh_dh], -1)], -2)
        return torch.stack([c_new, o * tc], -1), jac

    def jacobian(self, u, s):
        return self.step_and_jacobian(u, s)[1]


class ParaLSTM(ParaRNNLayer):
    """LSTM-CIFG with diagonal peepholes; ``mode="sequential" | "parallel"``."""

    gates = 3

    def make_cell(self, d_model, std):
        return ParaLSTMCell(d_model, std)

    def state_shapes(self, batch_size):
        return [(batch_size, self.d_model), (batch_size, self.d_model)]

    def pack_state(self, state):
        return torch.stack([state[0], state[1]], -1)

    def unpack_state(self, s):
        return (s[..., 0], s[..., 1])

    def output(self, s):
        return s[..., 1]


@register("paralstm", "LSTM-CIFG with diagonal recurrence and peepholes (ParaRNN; 2x2 block "
                      "Jacobians); mode='parallel' (Newton + scan) or 'sequential'")
def build_paralstm(d_model: int, **options) -> ParaLSTM:
    return ParaLSTM(d_model, **options)
