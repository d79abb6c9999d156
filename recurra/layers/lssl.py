"""LSSL: a linear state space layer with the dense HiPPO-LegS matrix (Gu et al. 2021).

Each of the d_model channels runs ``x_t = A_bar x_{t-1} + B_bar u_t``, ``y_t = C x_t + D u_t``
with the fixed HiPPO-LegS ``A``, ``B`` (``recurra.ops.s4d.hippo_legs``), a learned step size
per channel, learned ``C`` and ``D``; block ``out_proj(gelu(ssm(x)))``. Training uses the
Krylov-kernel convolution (``recurra.ops.lssl``), decoding the recurrence. O(N^2) per channel
and step: the diagonal ``s4d`` layer is the efficient successor.

State: (B, d_model, d_state) real.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lssl import DISCRETIZATIONS, discretize_dense, lssl_conv, lssl_reference
from ..ops.s4d import hippo_legs
from .base import RecurrentLayer, time_mask
from .registry import register


class LSSL(RecurrentLayer):
    """LSSL layer (HiPPO-LegS, bilinear or ZOH; see the module docstring)."""

    def __init__(self, d_model: int, d_state: int = 32, discretization: str = "bilinear",
                 dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, "
                             f"got {discretization!r}")
        if not isinstance(d_state, int) or d_state < 1:
            raise ValueError(f"d_state must be a positive int, got {d_state!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.input_size = self.output_size = d_model
        self.d_state, self.discretization = d_state, discretization
        A, B, _ = hippo_legs(d_state)
        dtype = torch.get_default_dtype()
        self.register_buffer("A", A.to(dtype))
        self.register_buffer("B", B.to(dtype))
        self.log_dt = nn.Parameter(torch.empty(d_model).uniform_(math.log(dt_min),
                                                                 math.log(dt_max)))
        self.C = nn.Parameter(torch.randn(d_model, d_state) / math.sqrt(d_state))
        self.D = nn.Parameter(torch.randn(d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.input_size}, d_state={self.d_state}, "
                f"discretization={self.discretization!r}")

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.input_size, self.d_state)]

    def _forward(self, x, state, lengths):
        t = x.shape[1]
        mask = None if lengths is None else time_mask(lengths, t).unsqueeze(-1)
        if mask is not None:
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        A_bar, B_bar = discretize_dense(self.A, self.B, self.log_dt.exp(), self.discretization)
        u = x.transpose(1, 2)
        if t == 1 and lengths is None:
            y, xt = lssl_reference(u, A_bar, B_bar, self.C, self.D, state[0])
        else:
            y, xt = lssl_conv(u, A_bar, B_bar, self.C, self.D, state[0], lengths=lengths)
        y = self.out_proj(F.gelu(y.transpose(1, 2)))
        if mask is not None:
            y = y * mask
        return y, (xt,)


@register("lssl", "LSSL: dense HiPPO-LegS state space layer (bilinear or ZOH), Krylov-kernel "
                  "convolution in parallel, recurrence in step")
def build_lssl(d_model: int, **options) -> LSSL:
    return LSSL(d_model, **options)
