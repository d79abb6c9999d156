"""ParaGRU: a GRU with diagonal recurrences (ParaRNN form), sequential or parallel (Newton).

Per channel, with u = (u_z, u_r, u_h) the input projections of x_t::

    z = sigmoid(a_z h + u_z),  r = sigmoid(a_r h + u_r)
    c = tanh(a_h (h r) + u_h)
    h' = z c + (1 - z) h          (z gates the *new* value, unlike torch.nn.GRU)

The Jacobian dh'/dh is diagonal, in closed form:
``(1 - z) + (c - h) a_z z(1 - z) + z (1 - c^2) a_h (r + h a_r r(1 - r))``.
State: ``(h,)`` with h of shape (B, d_model); output y_t = h_t.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops.newton import NewtonCell
from ._pararnn import ParaRNNLayer
from .registry import register


class ParaGRUCell(NewtonCell):
    """The ParaGRU recurrence on precomputed u (..., 3, D) and h (..., D)."""

    structure = "diagonal"

    def __init__(self, d_model: int, std: float):
        super().__init__()
        self.a_z = nn.Parameter(std * torch.randn(d_model))
        self.a_r = nn.Parameter(std * torch.randn(d_model))
        self.a_h = nn.Parameter(std * torch.randn(d_model))

    def _gates(self, u, h):
        u_z, u_r, u_h = u.unbind(-2)
        z = torch.sigmoid(self.a_z * h + u_z)
        r = torch.sigmoid(self.a_r * h + u_r)
        c = torch.tanh(self.a_h * (h * r) + u_h)
        return z, r, c

    def step(self, u, h):
        z, _, c = self._gates(u, h)
        return h + z * (c - h)

    def step_and_jacobian(self, u, h):
        z, r, c = self._gates(u, h)
        out = h + z * (c - h)
        jac = ((1 - z) + (c - h) * self.a_z * z * (1 - z)
               + z * (1 - c * c) * self.a_h * (r + h * self.a_r * r * (1 - r)))
        return out, jac

    def jacobian(self, u, h):
        return self.step_and_jacobian(u, h)[1]

    def newton_step_triton(self, u, h0, h, mask=None):
        """One fused Newton iteration in a Triton kernel (``NewtonSolver(backend="triton")``)."""
        from ..ops.newton_triton import paragru_newton_step_triton

        return paragru_newton_step_triton(u, h0, h, self.a_z, self.a_r, self.a_h, mask)


class ParaGRU(ParaRNNLayer):
    """GRU with diagonal recurrence; ``mode="sequential" | "parallel"`` (see ``_pararnn``)."""

    gates = 3

    def make_cell(self, d_model, std):
        return ParaGRUCell(d_model, std)

    def state_shapes(self, batch_size):
        return [(batch_size, self.d_model)]

    def pack_state(self, state):
        return state[0]

    def unpack_state(self, h):
        return (h,)

    def output(self, h):
        return h


@register("paragru", "GRU with diagonal recurrence (ParaRNN); mode='parallel' solves all steps "
                     "by Newton + linear scan, mode='sequential' loops")
def build_paragru(d_model: int, **options) -> ParaGRU:
    return ParaGRU(d_model, **options)
