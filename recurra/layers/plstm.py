"""pLSTM layers (Pöppel et al., arXiv 2506.11997): ``plstm`` on sequences, :class:`PLSTM2D` on grids.

Per head, with q = W_q x / sqrt(d_key), k = W_k x, v = W_v x and scalar gates from linear maps of x
(see :mod:`recurra.ops.plstm` for the recurrences):

Sequence layer (registered as ``plstm``), state C (B, H, d_key, head_dim):
    C_t = T_t C_{t-1} + S_t k_t v_t^T,   h_t = M_t q_t^T C_{t-1} + D_t (q_t . k_t) v_t,
    y_t = W_o h_t.
S, M, D are sigmoids. ``mode="P"``: T = sigmoid in (0, 1); ``mode="D"``: T = tanh in (-1, 1). On a
chain each node has one incoming and one outgoing edge, so both modes are the condition |T| <= 1
of their 2D definitions (P: outgoing transitions of an edge sum to at most 1; D: each |T| <= 1 on
a multitree); they differ only in allowing sign flips.

Grid module :class:`PLSTM2D` (x of shape (B, X, Y, D), not a RecurrentLayer: the contract is for
sequences). Four orientations (the grid flipped along none / X / Y / both axes) run as extra
heads and are averaged, as in the reference implementation.
- P-mode: orientation gate o = sigmoid(.), source s, transition t (sigmoids); T^rl = T^ru = o t,
  T^dl = T^du = 1 - o t, S^r = o s, S^d = 1 - S^r, M^l = M^u: the two transitions out of every
  incoming edge sum to 1, so the states stay bounded on large grids.
- D-mode: T^rl, T^du, and one cross transition T^x = tanh(.) (chirality L: T^ru = T^x, T^dl = 0),
  which prunes the line graph to a multitree; S^r, S^d, M^l, M^u sigmoids.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops.plstm import plstm_1d_chunked, plstm_2d_wavefront
from .base import RecurrentLayer, State, time_mask
from .registry import register

MODES = ("P", "D")


def _check_common(d_model, heads, head_dim, key_dim, mode):
    if mode not in MODES:
        raise ValueError(f"mode must be 'P' or 'D', got {mode!r}")
    for name, v in (("d_model", d_model), ("heads", heads), ("head_dim", head_dim),
                    ("key_dim", key_dim)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class PLSTMLayer(RecurrentLayer):
    """pLSTM on a sequence (a chain DAG); see the module docstring."""

    def __init__(self, d_model: int, heads: int = 4, head_dim: int | None = None,
                 key_dim: int | None = None, mode: str = "P", chunk: int = 64):
        super().__init__()
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        head_dim = d_model // heads if head_dim is None else head_dim
        key_dim = head_dim if key_dim is None else key_dim
        _check_common(d_model, heads, head_dim, key_dim, mode)
        if not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int, got {chunk!r}")
        self.input_size = self.output_size = d_model
        self.heads, self.head_dim, self.key_dim, self.mode, self.chunk = (
            heads, head_dim, key_dim, mode, chunk)
        self.to_qk = nn.Linear(d_model, 2 * heads * key_dim, bias=False)
        self.to_v = nn.Linear(d_model, heads * head_dim, bias=False)
        self.to_gates = nn.Linear(d_model, 4 * heads)  # source, transition, mark, direct
        with torch.no_grad():
            self.to_gates.bias.view(4, heads)[1].fill_(3.0)  # start with long memory
        self.to_out = nn.Linear(heads * head_dim, d_model, bias=False)

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.heads, self.key_dim, self.head_dim)]

    def _forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None):
        b, t, _ = x.shape
        h, dk, dv = self.heads, self.key_dim, self.head_dim
        q, k = self.to_qk(x).view(b, t, 2, h, dk).unbind(2)
        q = q / math.sqrt(dk)
        v = self.to_v(x).view(b, t, h, dv)
        gs, gt, gm, gd = self.to_gates(x).view(b, t, 4, h).unbind(2)
        source, mark, direct = torch.sigmoid(gs), torch.sigmoid(gm), torch.sigmoid(gd)
        transition = torch.sigmoid(gt) if self.mode == "P" else torch.tanh(gt)
        if lengths is not None:  # padding: no source, identity transition (state untouched)
            live = time_mask(lengths, t).unsqueeze(-1)
            source = torch.where(live, source, torch.zeros((), dtype=x.dtype, device=x.device))
            transition = torch.where(live, transition, torch.ones((), dtype=x.dtype,
                                                                   device=x.device))
        y, C = plstm_1d_chunked(q, k, v, source, transition, mark, direct, state[0],
                                chunk=self.chunk)
        y = self.to_out(y.reshape(b, t, h * dv))
        if lengths is not None:
            y = torch.where(time_mask(lengths, t).unsqueeze(-1), y,
                            torch.zeros((), dtype=y.dtype, device=y.device))
        return y, (C,)


class PLSTM2D(nn.Module):
    """pLSTM on a 2D grid: ``y = module(x)`` for x (B, X, Y, D); see the module docstring."""

    ORIENTATIONS = ((), (1,), (2,), (1, 2))  # axes of (B, X, Y, ...) to flip

    def __init__(self, d_model: int, heads: int = 2, head_dim: int | None = None,
                 key_dim: int | None = None, mode: str = "P"):
        super().__init__()
        if not isinstance(heads, int) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        head_dim = d_model // heads if head_dim is None else head_dim
        key_dim = head_dim if key_dim is None else key_dim
        _check_common(d_model, heads, head_dim, key_dim, mode)
        self.d_model, self.heads, self.head_dim, self.key_dim, self.mode = (
            d_model, heads, head_dim, key_dim, mode)
        n_or = len(self.ORIENTATIONS)
        self.to_qk = nn.Linear(d_model, 2 * heads * key_dim, bias=False)
        self.to_v = nn.Linear(d_model, heads * head_dim, bias=False)
        # per orientation and head: P: orientation, source, transition, mark, direct
        #                            D: source r, source d, T^rl, T^du, T^x, mark l, mark u, direct
        self.n_gates = 5 if mode == "P" else 8
        self.to_gates = nn.Linear(d_model, self.n_gates * n_or * heads)
        self.to_out = nn.Linear(heads * head_dim, d_model, bias=False)

    def gates(self, x: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Per orientation: (s_r, s_d, t_rl, t_ru, t_dl, t_du, m_l, m_u, direct), each (B, X, Y, H),
        in the grid's own (unflipped) coordinates."""
        b, X, Y, _ = x.shape
        z = self.to_gates(x).view(b, X, Y, self.n_gates, len(self.ORIENTATIONS), self.heads)
        out = []
        for o in range(len(self.ORIENTATIONS)):
            g = z[..., o, :].unbind(3)
            if self.mode == "P":
                orient, src, trans, mark, direct = (torch.sigmoid(a) for a in g)
                t_r = orient * trans
                s_r = orient * src
                out.append((s_r, 1 - s_r, t_r, t_r, 1 - t_r, 1 - t_r, mark, mark, direct))
            else:
                s_r, s_d = torch.sigmoid(g[0]), torch.sigmoid(g[1])
                t_rl, t_du, t_x = torch.tanh(g[2]), torch.tanh(g[3]), torch.tanh(g[4])
                m_l, m_u, direct = torch.sigmoid(g[5]), torch.sigmoid(g[6]), torch.sigmoid(g[7])
                out.append((s_r, s_d, t_rl, t_x, torch.zeros_like(t_x), t_du, m_l, m_u, direct))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (batch, X, Y, {self.d_model}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else x!r}")
        b, X, Y, _ = x.shape
        h, dk, dv = self.heads, self.key_dim, self.head_dim
        q, k = self.to_qk(x).view(b, X, Y, 2, h, dk).unbind(3)
        q = q / math.sqrt(dk)
        v = self.to_v(x).view(b, X, Y, h, dv)
        total = 0
        for flips, gates in zip(self.ORIENTATIONS, self.gates(x)):
            f = (lambda a: a.flip(flips)) if flips else (lambda a: a)
            y = plstm_2d_wavefront(f(q), f(k), f(v), *(f(g) for g in gates))
            total = total + f(y)
        y = total / len(self.ORIENTATIONS)
        return self.to_out(y.reshape(b, X, Y, h * dv))


@register("plstm", "pLSTM on a sequence (Source/Transition/Mark/Direct gates; mode 'P' or 'D'),"
                   " chunkwise-parallel")
def build_plstm(d_model: int, **options) -> PLSTMLayer:
    return PLSTMLayer(d_model, **options)
