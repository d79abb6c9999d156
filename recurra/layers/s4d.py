"""S4D: a diagonal state space layer (Gu et al., "On the Parameterization and Initialization of
Diagonal State Space Models", 2022), trained by FFT convolution, decoded by its recurrence.

Each of the d_model channels is an independent complex diagonal SSM with ``d_state / 2`` modes
(see ``recurra.ops.s4d``); the block is ``out_proj(gelu(ssm(x)))``.

Options: ``init`` in ``"legs"`` (HiPPO-LegS, the diagonal of its normal part), ``"lin"``,
``"inv"``; ``discretization`` in ``"zoh"`` and ``"bilinear"``.

State: the complex SSM state as a real tensor (B, d_model, d_state / 2, 2) (real, imaginary).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.s4d import DISCRETIZATIONS, discretize, init_lambda, s4d_fft, s4d_reference
from .base import RecurrentLayer, time_mask
from .registry import register


class S4D(RecurrentLayer):
    """S4D layer.

    Args:
        d_model: input and output width (one SSM per channel).
        d_state: N, even (N / 2 complex modes per channel).
        init: ``"legs"``, ``"lin"`` or ``"inv"``.
        discretization: ``"zoh"`` or ``"bilinear"``.
        dt_min, dt_max: range of the initial step sizes (log-uniform per channel).
    """

    def __init__(self, d_model: int, d_state: int = 64, init: str = "legs",
                 discretization: str = "zoh", dt_min: float = 1e-3, dt_max: float = 1e-1):
        super().__init__()
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"discretization must be one of {DISCRETIZATIONS}, "
                             f"got {discretization!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        lam, B = init_lambda(init, d_state)                       # validates init, d_state
        self.input_size = self.output_size = d_model
        self.d_state, self.init, self.discretization = d_state, init, discretization
        h, n2 = d_model, d_state // 2
        dtype = torch.get_default_dtype()
        self.log_dt = nn.Parameter(torch.empty(h).uniform_(math.log(dt_min), math.log(dt_max)))
        self.log_neg_re = nn.Parameter((-lam.real).log().to(dtype).repeat(h, 1))
        self.lam_im = nn.Parameter(lam.imag.to(dtype).repeat(h, 1))
        self.B_re = nn.Parameter(B.real.to(dtype).repeat(h, 1))
        self.B_im = nn.Parameter(B.imag.to(dtype).repeat(h, 1))
        self.C_re = nn.Parameter(torch.randn(h, n2) * math.sqrt(0.5))
        self.C_im = nn.Parameter(torch.randn(h, n2) * math.sqrt(0.5))
        self.D = nn.Parameter(torch.randn(h))
        self.out_proj = nn.Linear(d_model, d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.input_size}, d_state={self.d_state}, init={self.init!r}, "
                f"discretization={self.discretization!r}")

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.input_size, self.d_state // 2, 2)]

    def discrete(self):
        """``(A_bar, B_bar, C)``: the discretised complex parameters, (d_model, d_state / 2)."""
        lam = torch.complex(-self.log_neg_re.exp(), self.lam_im)
        A_bar, B_bar = discretize(lam, torch.complex(self.B_re, self.B_im), self.log_dt.exp(),
                                  self.discretization)
        return A_bar, B_bar, torch.complex(self.C_re, self.C_im)

    def _forward(self, x, state, lengths):
        t = x.shape[1]
        mask = None if lengths is None else time_mask(lengths, t).unsqueeze(-1)
        if mask is not None:
            x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        A_bar, B_bar, C = self.discrete()
        x0 = torch.view_as_complex(state[0].contiguous())
        u = x.transpose(1, 2)
        if t == 1 and lengths is None:
            y, xt = s4d_reference(u, A_bar, B_bar, C, self.D, x0)
        else:
            y, xt = s4d_fft(u, A_bar, B_bar, C, self.D, x0, lengths=lengths)
        y = self.out_proj(F.gelu(y.transpose(1, 2)))
        if mask is not None:
            y = y * mask
        return y, (torch.view_as_real(xt),)


@register("s4d", "S4D diagonal SSM (HiPPO-LegS / S4D-Lin / S4D-Inv init, ZOH or bilinear), "
                 "FFT convolution in parallel, recurrence in step")
def build_s4d(d_model: int, **options) -> S4D:
    return S4D(d_model, **options)
