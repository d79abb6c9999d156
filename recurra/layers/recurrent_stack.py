"""Stacked, optionally bidirectional, multi-head classic RNNs with torch.nn's names and semantics.

``StackedRNN`` is the shared machinery of ``LSTM``, ``GRU``, ``RNN`` (Elman) and ``SLSTM``:
- parameters ``weight_ih_l{k}[_reverse]`` (G*H, in), ``weight_hh_l{k}[_reverse]`` (G*H, H/N),
  ``bias_ih_l{k}[_reverse]``, ``bias_hh_l{k}[_reverse]`` (G*H,), rows in torch.nn's gate order.
  With ``num_heads=1`` these are exactly torch.nn's parameters (a torch.nn state dict loads as
  is); with N heads row ``g*H + n*dh + d`` of ``weight_hh`` holds head n's block, so the
  recurrent matrix of gate g is block-diagonal (FlashRNN's multi-head cells);
- the state is a tuple of tensors shaped like torch.nn's ``h_n``: (num_layers * num_directions,
  B, H), batch on axis 1 (``state_batch_dim = 1``). LSTM: (h, c); GRU and RNN: (h,); sLSTM:
  (h, c, n, m). A bare tensor is accepted as ``state`` for one-component states;
- ``backend``: ``"native"`` runs torch's own kernel (oneDNN for LSTM on CPU; ``num_heads=1``
  only, not sLSTM), ``"compiled"`` the time loop in C++ with a hand-written backward (CPU; built
  on first use), ``"fused"`` the same loop and backward in Python (any device), ``"reference"``
  the plain loop with autograd. ``"auto"`` picks compiled on the CPU and fused elsewhere, except
  for a single-head LSTM with more than ``NATIVE_LSTM_MIN_WORK`` = 1024 batch rows x hidden
  units, which runs torch's oneDNN kernel (faster there; for small problems its per-step
  overhead dominates and the C++ loop is up to 1.5x faster). If the C++ loop cannot be built,
  auto warns once (``CompiledBackendWarning``) and runs fused. ``resolved_backend(batch_size)``
  says which backend a call runs. The backends compute the same function (to float rounding;
  tested against each other and torch.nn); an impossible request raises;
- row-exact inference (``recurra.ops.row_exact``): with ``backend="auto"``, a call under no_grad
  on the CPU with at most ``row_exact.EXACT_ROWS`` rows (batch x time) runs the compiled loop
  with the row-exact products (input projection and recurrence), whatever ``resolved_backend``
  says: every row's outputs and states are then bitwise the same whatever the other rows, so
  ``step`` and a many-row forward (a verified draft tree) agree exactly.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import chunked_scan_compiled, recurrent_compiled, row_exact
from ..ops.recurrent_cells import CELLS
from ..ops.recurrent_fused import recurrence
from ..ops.streamed_matmul import pack_panels
from .base import RecurrentLayer, State, reverse_padded, time_mask

BACKENDS = ("auto", "native", "compiled", "fused", "reference")
#: ``auto`` runs a single-head LSTM on torch's kernel when batch x hidden exceeds this
NATIVE_LSTM_MIN_WORK = 1024


class CompiledBackendWarning(UserWarning):
    """backend="auto" could not use the compiled C++ loop and runs the fused Python loop."""


_compiled_checked = False


def _compiled_available() -> bool:
    global _compiled_checked
    if recurrent_compiled.available():
        return True
    if not _compiled_checked:
        _compiled_checked = True
        warnings.warn(
            f"recurra: {recurrent_compiled.unavailable_reason()}. backend='auto' runs the "
            "'fused' Python loop instead (the same numbers, slower); pass backend='fused' to "
            "choose it explicitly.", CompiledBackendWarning, stacklevel=3)
    return False


class StackedRNN(RecurrentLayer):
    cell: str = ""
    state_batch_dim = 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        dropout: float = 0.0,
        bidirectional: bool = False,
        num_heads: int = 1,
        backend: str = "auto",
        nonlinearity: str = "tanh",
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_positive("input_size", input_size)
        _check_positive("hidden_size", hidden_size)
        _check_positive("num_layers", num_layers)
        _check_positive("num_heads", num_heads)
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )
        if not (isinstance(dropout, (int, float)) and 0 <= dropout <= 1):
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        if backend not in BACKENDS:
            raise ValueError(
                f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}"
            )
        if backend == "native" and (num_heads != 1 or self.cell == "slstm"):
            raise ValueError(
                "backend='native' (torch's own kernel) serves only single-head LSTM, GRU and "
                f"RNN layers; this is a {self.cell} layer with num_heads={num_heads}"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.dropout = float(dropout)
        self.bidirectional = bidirectional
        self.num_heads = num_heads
        self.nonlinearity = nonlinearity
        self.backend = backend
        self.causal = not bidirectional
        self.num_directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.num_directions
        self.gates, self.n_states = CELLS[self.cell]
        factory = {"device": device, "dtype": dtype}
        head = hidden_size // num_heads
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else self.output_size
            for suffix in self._suffixes(layer):
                G = self.gates * hidden_size
                setattr(self, f"weight_ih{suffix}", nn.Parameter(torch.empty(G, layer_in,
                                                                             **factory)))
                setattr(self, f"weight_hh{suffix}", nn.Parameter(torch.empty(G, head, **factory)))
                if bias:
                    setattr(self, f"bias_ih{suffix}", nn.Parameter(torch.empty(G, **factory)))
                    setattr(self, f"bias_hh{suffix}", nn.Parameter(torch.empty(G, **factory)))
        self.reset_parameters()

    # ------------------------------------------------------------------ set-up
    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}"] + ([f"_l{layer}_reverse"] if self.bidirectional else [])

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: U(-1/sqrt(H), 1/sqrt(H)) for every parameter."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if self.num_heads != 1:
            s += f", num_heads={self.num_heads}"
        if not self.bias:
            s += ", bias=False"
        if not self.batch_first:
            s += ", batch_first=False"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s

    @property
    def row_exact(self) -> bool:
        """Row-exact inference (module docstring) runs with ``backend="auto"``."""
        return self.backend == "auto"

    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        shape = (self.num_layers * self.num_directions, batch_size, self.hidden_size)
        return [shape] * self.n_states

    def resolved_backend(self, batch_size: int | None = None) -> str:
        """The backend a call with ``batch_size`` rows runs: ``backend`` unless it is
        ``"auto"``, which picks torch's kernel for a single-head LSTM when batch_size x
        hidden_size > ``NATIVE_LSTM_MIN_WORK`` (or batch_size is None), else the compiled C++
        loop on the CPU (with a warning, once, and the fused Python loop when it cannot be built
        here) and the fused loop on other devices."""
        if self.backend != "auto":
            return self.backend
        if self.cell == "lstm" and self.num_heads == 1 and (
                batch_size is None or batch_size * self.hidden_size > NATIVE_LSTM_MIN_WORK
                or self.weight_hh_l0.device.type != "cpu"):
            return "native"
        if self.weight_hh_l0.device.type != "cpu":
            return "fused"
        return "compiled" if _compiled_available() else "fused"

    # ------------------------------------------------------------------ forward
    def forward(self, x, state=None, lengths=None):
        """``y, state = layer(x, state=None, lengths=None)``; x is (B, T, in) when
        batch_first (the default), else (T, B, in). See the module docstring."""
        if not self.batch_first:
            if isinstance(x, torch.Tensor) and x.dim() == 3:
                x = x.transpose(0, 1)
            y, state = super().forward(x, state, lengths)
            return y.transpose(0, 1), state
        return super().forward(x, state, lengths)

    def step(self, x_t, state=None):
        if self.batch_first:
            return super().step(x_t, state)
        # step() is batch-first whatever batch_first says: x_t is (B, in)
        self.batch_first = True
        try:
            return super().step(x_t, state)
        finally:
            self.batch_first = False

    def _forward(self, x: torch.Tensor, state: State, lengths: torch.Tensor | None,
                 over_time: bool = False):
        B, T, _ = x.shape
        if T == 0:
            N, dh = self.num_heads, self.hidden_size // self.num_heads
            empty = tuple(tuple(s.new_zeros(0, N, B, dh) for _ in range(s.shape[0]))
                          for s in state)
            return (x.new_zeros(B, 0, self.output_size), state) + ((empty,) if over_time else ())
        exact = self.backend == "auto" and row_exact.applies(x, B * T)
        backend = "compiled" if exact else self.resolved_backend(B)
        if backend == "native" and over_time:  # torch's kernel returns the final state only
            backend = "compiled" if _compiled_available() else "fused"
        if backend == "native":
            return self._native_forward(x, state, lengths)
        finals: list[list[torch.Tensor]] = [[] for _ in range(self.n_states)]
        steps: list[list[torch.Tensor]] = [[] for _ in range(self.n_states)]
        inp = x
        for layer in range(self.num_layers):
            outs = []
            for d, suffix in enumerate(self._suffixes(layer)):
                k = layer * self.num_directions + d
                s0 = tuple(s[k] for s in state)
                src = inp if d == 0 else reverse_padded(inp, lengths)
                y, s_final, s_steps = self._run_direction(src, suffix, s0, lengths, backend,
                                                          exact, over_time)
                outs.append(y if d == 0 else reverse_padded(y, lengths))
                for j, s in enumerate(s_final):
                    finals[j].append(s)
                    if over_time:
                        steps[j].append(s_steps[j])
            inp = torch.cat(outs, -1) if len(outs) > 1 else outs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                inp = F.dropout(inp, self.dropout, training=True)
        if lengths is not None:
            inp = inp * time_mask(lengths, T).unsqueeze(-1).to(inp.dtype)
        final = tuple(torch.stack(f, 0) for f in finals)
        if over_time:  # per component, the (T, N, B, dh) states of every layer (no copy)
            return inp, final, tuple(tuple(f) for f in steps)
        return inp, final

    @property
    def states_over_time(self) -> bool:
        """``forward_states`` serves the causal (unidirectional) layers."""
        return self.causal

    def forward_states(self, x, state=None, lengths=None):
        """``y, state, states``: ``forward``, plus the state after every step. ``states`` is
        read by :meth:`state_at`: ``state_at(states, b, t)`` is row b's state after its step
        t (for t < its length), the same values as the final state of a call that stops there
        (bitwise, under row-exact inference). Causal layers only. Decoding uses it to commit a
        verified path's state without running the path again."""
        if not self.causal:
            raise ValueError(f"{type(self).__name__} is bidirectional: the state after a step "
                             "depends on the future, so it has no forward_states()")
        if not self.batch_first:
            raise ValueError("forward_states() is batch-first: construct with batch_first=True")
        state, lengths = self.check_call(x, state, lengths)
        return self._forward(x, state, lengths, over_time=True)

    def state_at(self, states, rows, times) -> State:
        """The states after step ``times[i]`` of row ``rows[i]`` (``forward_states``'s
        ``states``; ``rows`` and ``times`` ints or equal-length long tensors), as a state of
        ``len(rows)`` rows."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        times = torch.as_tensor(times, dtype=torch.long).reshape(-1)
        # states[j][layer] is (T, N, B, dh): row b after step t is [t, :, b], heads in order
        return tuple(torch.stack([s[times, :, rows].reshape(len(rows), self.hidden_size)
                                  for s in per_layer]) for per_layer in states)

    def _direction_weights(self, suffix):
        """One direction's weights as the time loop takes them: the input weight with its rows
        regrouped head by head (G*H, in), the folded bias (G*H,) or None, the recurrent weight
        head by head r (N, dh, G*dh), and GRU's b_hn (N, 1, dh) or None."""
        N, H, G = self.num_heads, self.hidden_size, self.gates
        dh = H // N
        w_ih = getattr(self, f"weight_ih{suffix}")
        w_hh = getattr(self, f"weight_hh{suffix}")
        bias_hn = None
        if self.bias:
            b_ih = getattr(self, f"bias_ih{suffix}")
            b_hh = getattr(self, f"bias_hh{suffix}")
            if self.cell == "gru":  # b_hn stays inside the reset gate
                b = b_ih + torch.cat([b_hh[:2 * H], b_hh.new_zeros(H)])
                bias_hn = b_hh[2 * H:].view(N, 1, dh)
            else:
                b = b_ih + b_hh
            b = b.view(G, N, dh).transpose(0, 1).reshape(G * H)
        else:
            b = None
        # rows regrouped head by head, so that wx[t] is a (N, B, G*dh) view (no copy)
        w_ih = w_ih.view(G, N, dh, -1).transpose(0, 1).reshape(G * H, -1)
        r = w_hh.view(G, N, dh, dh).permute(1, 3, 0, 2).reshape(N, dh, G * dh)
        return w_ih, b, r, bias_hn

    def _exact_weights(self, suffix):
        """``_direction_weights`` detached, plus the packed panels of the input weight's
        transpose and of r (for the row-exact products), kept while the parameters are unchanged
        (the packing costs more than a decoding step)."""
        names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
        params = [getattr(self, n + suffix) for n in names]
        key = tuple((p._version, p.data_ptr(), p.dtype) for p in params)
        cache = self.__dict__.setdefault("_exact_cache", {})
        entry = cache.get(suffix)
        if entry is None or entry[0] != key:
            with torch.no_grad():
                w_ih, b, r, bias_hn = self._direction_weights(suffix)
                r = r.contiguous()
                entry = (key, (pack_panels(w_ih.t()), b, r,
                               recurrent_compiled.pack_recurrent(r), bias_hn))
            cache[suffix] = entry
        return entry[1]

    def _run_direction(self, x, suffix, s0, lengths, backend, exact=False, over_time=False):
        """One layer, one direction: x (B, T, in) -> y (B, T, H), final state parts (B, H),
        and with ``over_time`` the state parts after every step (T, N, B, dh) (else None).
        ``exact``: the row-exact products (see the module docstring)."""
        B, T, _ = x.shape
        N, H, G = self.num_heads, self.hidden_size, self.gates
        dh = H // N
        panels = None
        if exact:
            w_panels, b, r, panels, bias_hn = self._exact_weights(suffix)
            ext = chunked_scan_compiled.EXTENSION.load()
            wx = ext.streamed_matmul(x.transpose(0, 1).reshape(T * B, -1).contiguous(),
                                     w_panels, G * H)
            if b is not None:
                wx += b
        else:
            w_ih, b, r, bias_hn = self._direction_weights(suffix)
            # One GEMM over all steps, time-major: wx[t] is a (N, B, G*dh) view
            wx = F.linear(x.transpose(0, 1), w_ih, b)  # (T, B, N*G*dh)
        wx = wx.view(T, B, N, G * dh).transpose(1, 2)
        heads0 = tuple(s.view(B, N, dh).transpose(0, 1) for s in s0)
        states = recurrence(self.cell, wx, r, heads0, bias_hn=bias_hn,
                            nonlinearity=self.nonlinearity, backend=backend, panels=panels)
        y = states[0].permute(2, 0, 1, 3).reshape(B, T, H)
        if lengths is None:
            final = [s[-1] for s in states]
        else:
            idx = (lengths - 1).clamp(min=0).view(1, 1, B, 1).expand(1, N, B, dh)
            final = [torch.where((lengths > 0).view(1, B, 1), s.gather(0, idx)[0], s0_)
                     for s, s0_ in zip(states, heads0)]
        steps = states if over_time else None  # (T, N, B, dh) each
        return y, tuple(f.transpose(0, 1).reshape(B, H) for f in final), steps

    def _native_forward(self, x, state, lengths):
        B, T, _ = x.shape
        weights = []
        for layer in range(self.num_layers):
            for suffix in self._suffixes(layer):
                names = ["weight_ih", "weight_hh"] + (["bias_ih", "bias_hh"] if self.bias else [])
                weights += [getattr(self, n + suffix) for n in names]
        fn = {"lstm": torch._VF.lstm, "gru": torch._VF.gru,
              "elman": torch._VF.rnn_tanh if self.nonlinearity == "tanh" else torch._VF.rnn_relu
              }[self.cell]
        hx = state if self.cell == "lstm" else state[0]
        args = (weights, self.bias, self.num_layers, self.dropout, self.training,
                self.bidirectional)
        if lengths is None:
            out = fn(x, hx, *args, True)
            y, new = out[0], out[1:]
            return y, tuple(new)
        # packed sequences: torch's kernel stops each row at its length (rows of length 0 run
        # one step on padding; their outputs and states are replaced below)
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        perm = packed.sorted_indices
        hx_sorted = tuple(h.index_select(1, perm) for h in state)
        out = fn(packed.data, packed.batch_sizes,
                 hx_sorted if self.cell == "lstm" else hx_sorted[0], *args)
        y_packed = nn.utils.rnn.PackedSequence(out[0], packed.batch_sizes, perm,
                                               packed.unsorted_indices)
        y, _ = nn.utils.rnn.pad_packed_sequence(y_packed, batch_first=True, total_length=T)
        new = tuple(h.index_select(1, packed.unsorted_indices) for h in out[1:])
        empty = (lengths == 0)
        y = y * (~empty).view(B, 1, 1).to(y.dtype)
        new = tuple(torch.where(empty.view(1, B, 1), s0, s) for s, s0 in zip(new, state))
        return y, new


def _check_positive(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def from_torch(module: nn.Module, backend: str = "auto", batch_first: bool | None = None):
    """A recurra layer with ``module``'s configuration and weights (torch.nn.LSTM/GRU/RNN).

    The result reproduces the module's outputs and final states. ``batch_first`` defaults to
    the module's own setting, so the two can be called on the same tensors.
    """
    from .elman import RNN
    from .gru import GRU
    from .lstm import LSTM

    kinds = {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}
    cls = kinds.get(type(module))
    if cls is None:
        raise ValueError(
            f"module must be a torch.nn.LSTM, GRU or RNN, got {type(module).__name__}"
        )
    if getattr(module, "proj_size", 0):
        raise ValueError("module has proj_size > 0 (LSTM projections), which recurra lacks")
    p = next(module.parameters())
    extra = {"nonlinearity": module.nonlinearity} if cls is RNN else {}
    layer = cls(module.input_size, module.hidden_size, num_layers=module.num_layers,
                bias=module.bias, batch_first=module.batch_first if batch_first is None
                else batch_first, dropout=module.dropout, bidirectional=module.bidirectional,
                backend=backend, device=p.device, dtype=p.dtype, **extra)
    layer.load_state_dict(module.state_dict())
    return layer
