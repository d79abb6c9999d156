"""Shared machinery of the ParaRNN layers (paragru, paralstm): per-head input projections, the
two execution modes and padding. Each layer supplies a :class:`recurra.ops.newton.NewtonCell`.

``mode="sequential"`` runs the plain loop over time (autograd through it); ``mode="parallel"``
solves all steps at once with :class:`recurra.ops.newton.NewtonSolver` (Newton iterations, each
one linear scan; implicit backward). Both modes evaluate the same cell, so they compute the same
function (the parallel mode to the solver's tolerance; with ``iterations=3`` it is ParaRNN's
fixed-iteration approximation instead).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.newton import NewtonCell, NewtonSolver, sequential_solve
from .base import RecurrentLayer, State, time_mask

MODES = ("sequential", "parallel")


class ParaRNNLayer(RecurrentLayer):
    """A recurrent layer whose recurrence is a :class:`NewtonCell` with ``gates`` input streams.

    The input projection is block-diagonal over ``num_heads`` heads (ParaRNN's multi-head form):
    head j maps its d_model/num_heads input features to ``gates`` x d_model/num_heads
    pre-activations. Subclasses define ``gates``, ``make_cell``, ``pack_state``,
    ``unpack_state``, ``output`` and ``state_shapes``.
    """

    gates: int = 3

    def __init__(self, d_model: int, num_heads: int = 1, mode: str = "parallel",
                 iterations: int | None = None, atol: float | None = None,
                 rtol: float | None = None, max_iters: int = 50, damping: float = 0.0,
                 strict: bool = False, recurrent_std: float | None = None,
                 backend: str = "torch"):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(num_heads, int) or num_heads < 1 or d_model % num_heads:
            raise ValueError(f"num_heads must be a positive int dividing d_model={d_model}, "
                             f"got {num_heads!r}")
        self.input_size = self.output_size = d_model
        self.d_model, self.num_heads = d_model, num_heads
        head = d_model // num_heads
        bound = 1 / math.sqrt(head)
        self.weight = nn.Parameter(
            torch.empty(num_heads, head, self.gates * head).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(self.gates, d_model))
        # ParaRNN's "xlstm" init of the diagonal recurrences: N(0, (2 / sqrt(5 D))^2)
        std = 2 / math.sqrt(5 * d_model) if recurrent_std is None else recurrent_std
        self.cell = self.make_cell(d_model, std)
        self.solver = NewtonSolver(iterations=iterations, atol=atol, rtol=rtol,
                                   max_iters=max_iters, damping=damping, strict=strict,
                                   backend=backend)
        self.mode = mode

    # ------------------------------------------------------------------ subclass interface
    def make_cell(self, d_model: int, std: float) -> NewtonCell:
        raise NotImplementedError

    def pack_state(self, state: State) -> torch.Tensor:
        raise NotImplementedError

    def unpack_state(self, h: torch.Tensor) -> State:
        raise NotImplementedError

    def output(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------------------ common
    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {value!r}")
        self._mode = value

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_heads={self.num_heads}, mode={self.mode!r}, "
                f"solver={self.solver!r}")

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Input pre-activations u (B, T, gates, D) for all steps, by one batched GEMM."""
        batch, steps, _ = x.shape
        heads, head = self.num_heads, self.d_model // self.num_heads
        z = torch.einsum("bthi,hio->btho", x.reshape(batch, steps, heads, head), self.weight)
        # memory layout (gates, B, T, D): each gate's (B, T, D) slice is contiguous, which keeps
        # the cell's elementwise ops on TensorIterator's fast path; returned as a (B, T, gates, D)
        # view
        z = z.reshape(batch, steps, heads, self.gates, head).permute(3, 0, 1, 2, 4)
        z = z.reshape(self.gates, batch, steps, self.d_model) + self.bias.view(
            self.gates, 1, 1, self.d_model)
        return z.permute(1, 2, 0, 3)

    def _forward(self, x, state, lengths):
        batch, steps, _ = x.shape
        if steps == 0:
            return x.new_zeros(batch, 0, self.output_size), state
        u = self.project(x)
        h0 = self.pack_state(state)
        mask = time_mask(lengths, steps) if lengths is not None else None
        if self.mode == "sequential":
            h = sequential_solve(self.cell, u, h0, mask)
        else:
            h = self.solver.solve(self.cell, u, h0, mask)
        y = self.output(h)
        if mask is not None:
            y = y * mask.unsqueeze(-1).to(y.dtype)
        return y, self.unpack_state(h[:, -1])
