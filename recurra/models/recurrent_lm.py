"""A language model built from any registered recurrent layer.

    tokens (B, T)
      -> token embedding                                   (B, T, d_model)
      -> n_layers x Block:
             x = x + RecurrentLayer(RMSNorm(x))            (the layer carries the state)
             x = x + MLP(RMSNorm(x))                       (Linear -> GELU -> Linear)
      -> final RMSNorm                                     (the "hidden" states)
      -> output head (tied to the embedding by default)    (B, T, vocab_size)

``logits, state = model(tokens, state=None, lengths=None)``: ``state`` is a tuple with one layer
state per block; passing it back continues every sequence exactly, so a long text can be fed in
chunks (stateful truncated back-propagation) and generation needs only ``model.step``.

Prefix layers: besides causal layers, a block accepts a layer that is causal *after a prefix*
(attribute ``causal_after_prefix = True``, e.g. ``jrt``): it reads the first P tokens of a
sequence non-causally and every later position causally. ``model(tokens, prefix_lengths=P)``
(an int or one per row) gives every such layer the prefix of the sequences this call starts;
the rest of the block (norms, MLP) is position-wise, so the logits at positions >= P depend only
on the prefix and the tokens before them. After the prefix, further calls and ``step`` decode
causally from the carried state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..layers import RecurrentLayer, build, check_lengths, time_mask
from ..layers.jrt import check_prefix_lengths
from ..ops import row_exact

ModelState = tuple  # tuple of per-block layer states (each a tuple of tensors)


@dataclass
class RecurrentLMConfig:
    """Everything needed to rebuild a :class:`RecurrentLM` (``RecurrentLM(**asdict(config))``)."""

    vocab_size: int
    d_model: int
    n_layers: int
    layer: str = "lstm"
    layer_options: dict[str, Any] = field(default_factory=dict)
    mlp_ratio: float = 4
    dropout: float = 0.0
    tie_weights: bool = True


def reads_prefix(layer: RecurrentLayer) -> bool:
    """True for a non-causal layer that is causal after a prefix (``causal_after_prefix``) and
    takes ``prefix_lengths`` in its forward."""
    return not layer.causal and bool(getattr(layer, "causal_after_prefix", False))


class MLP(nn.Module):
    """Position-wise feed-forward: Linear(d, h) -> GELU -> Linear(h, d)."""

    def __init__(self, d_model: int, hidden: int, dropout: float):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # row_exact.linear is F.linear, row-exact for small inference calls (recurra.ops.row_exact)
        h = self.act(row_exact.linear(x, self.up.weight, self.up.bias))
        return self.dropout(row_exact.linear(h, self.down.weight, self.down.bias))


class Block(nn.Module):
    """Pre-norm residual block: a recurrent layer, then (optionally) an MLP."""

    def __init__(self, d_model: int, layer: str, layer_options: dict, mlp_ratio: float,
                 dropout: float):
        super().__init__()
        self.norm_mix = nn.RMSNorm(d_model, eps=1e-6)
        self.mixer: RecurrentLayer = build(layer, d_model, **layer_options)
        if self.mixer.input_size != d_model or self.mixer.output_size != d_model:
            raise ValueError(
                f"layer {layer!r} built with d_model={d_model} maps {self.mixer.input_size} -> "
                f"{self.mixer.output_size} features; a block needs {d_model} -> {d_model}"
            )
        #: the mixer reads a prefix non-causally and is causal after it
        self.reads_prefix = reads_prefix(self.mixer)
        if not (self.mixer.causal or self.reads_prefix):
            raise ValueError(f"layer {layer!r} is not causal (nor causal after a prefix); a "
                             "language model needs a causal one")
        self.dropout = nn.Dropout(dropout)
        hidden = round(mlp_ratio * d_model)
        if hidden > 0:
            self.norm_mlp = nn.RMSNorm(d_model, eps=1e-6)
            self.mlp = MLP(d_model, hidden, dropout)
        else:
            self.norm_mlp = None
            self.mlp = None

    def forward(self, x: torch.Tensor, state, lengths: torch.Tensor | None,
                prefix_lengths: torch.Tensor | None = None, over_time: bool = False):
        """``x, state`` after the block; with ``over_time`` also the layer's states after every
        step (``mixer.forward_states``)."""
        steps = None
        if self.reads_prefix:
            y, state = self.mixer(self.norm_mix(x), state, lengths, prefix_lengths=prefix_lengths)
        elif over_time:
            y, state, steps = self.mixer.forward_states(self.norm_mix(x), state, lengths)
        else:
            y, state = self.mixer(self.norm_mix(x), state, lengths)
        x = x + self.dropout(y)
        if self.mlp is not None:
            x = x + self.mlp(self.norm_mlp(x))
        return (x, state, steps) if over_time else (x, state)

    def step(self, x_t: torch.Tensor, state):
        y_t, state = self.mixer.step(self.norm_mix(x_t), state)
        x_t = x_t + self.dropout(y_t)
        if self.mlp is not None:
            x_t = x_t + self.mlp(self.norm_mlp(x_t))
        return x_t, state


class RecurrentLM(nn.Module):
    """Token embedding -> pre-norm recurrent blocks -> final norm -> (tied) output head."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        layer: str = "lstm",
        layer_options: dict[str, Any] | None = None,
        mlp_ratio: float = 4,
        dropout: float = 0.0,
        tie_weights: bool = True,
    ):
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("d_model", d_model),
                            ("n_layers", n_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(mlp_ratio, (int, float)) or mlp_ratio < 0:
            raise ValueError(f"mlp_ratio must be a number >= 0 (0 = no MLP), got {mlp_ratio!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        layer_options = dict(layer_options or {})
        self.config = RecurrentLMConfig(
            vocab_size, d_model, n_layers, layer, layer_options, mlp_ratio, dropout, tie_weights
        )

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, layer, layer_options, mlp_ratio, dropout) for _ in range(n_layers)
        )
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self._init_weights()
        if tie_weights:
            self.head.weight = self.embedding.weight

    def _init_weights(self) -> None:
        """GPT-2 style for the parts this model owns; the recurrent layers keep their own init."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.head.weight, std=0.02)
        for block in self.blocks:
            if block.mlp is not None:
                nn.init.normal_(block.mlp.up.weight, std=0.02)
                nn.init.zeros_(block.mlp.up.bias)
                # residual projections shrink with depth so the stream's variance stays O(1)
                nn.init.normal_(block.mlp.down.weight, std=0.02 / math.sqrt(2 * len(self.blocks)))
                nn.init.zeros_(block.mlp.down.bias)

    @property
    def row_exact(self) -> bool:
        """True when this model's inference forward is row-exact (``recurra.ops.row_exact``):
        under no_grad on the CPU, a call of at most ``row_exact.EXACT_ROWS`` tokens gives every
        row bitwise what ``step`` gives it, so a draft verified in one forward matches greedy
        decoding exactly. Needs every block's layer to be row-exact (the classic cells with
        backend "auto"), float32/float64 weights on the CPU, and the compiled kernels."""
        weight = self.embedding.weight
        return (all(block.mixer.row_exact for block in self.blocks)
                and weight.device.type == "cpu"
                and weight.dtype in (torch.float32, torch.float64) and row_exact.available())

    @property
    def reads_prefix(self) -> bool:
        """True when some block's layer reads a prefix non-causally (see the module docstring)."""
        return any(block.reads_prefix for block in self.blocks)

    # ----------------------------------------------------------------- state
    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """The state of empty sequences: one layer state per block."""
        return tuple(b.mixer.init_state(batch_size, device=device, dtype=dtype)
                     for b in self.blocks)

    def reorder_state(self, state: ModelState, index: torch.Tensor) -> ModelState:
        """Select (and repeat) batch rows: row i of the result is row ``index[i]``."""
        self._check_state_arity(state)
        return tuple(b.mixer.reorder_state(s, index) for b, s in zip(self.blocks, state))

    def _check_state_arity(self, state) -> None:
        if not isinstance(state, (tuple, list)) or len(state) != len(self.blocks):
            got = len(state) if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(
                f"state must be a tuple of {len(self.blocks)} layer states (one per block, as "
                f"returned by the model), got {got}"
            )

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        tokens: torch.Tensor,
        state: ModelState | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
        return_hidden: bool = False,
        prefix_lengths: int | torch.Tensor | Sequence[int] | None = None,
    ):
        """``tokens`` (B, T) -> ``logits`` (B, T, vocab_size), ``state``.

        With ``lengths`` (B,), row b reads only ``tokens[b, :lengths[b]]``: its returned state is
        the one after ``lengths[b]`` tokens, and its logits (and hidden states) beyond are 0.
        With ``return_hidden=True`` also returns the final-norm hidden states (B, T, d_model).
        ``prefix_lengths`` (an int or (B,) ints in [0, T]; only for models whose layers read a
        prefix, see :attr:`reads_prefix`): the prefix of each sequence this call starts; None
        leaves each layer to its default.
        """
        state, lengths = self._check_call(tokens, state, lengths)
        batch, steps = tokens.shape
        if prefix_lengths is not None:
            if not self.reads_prefix:
                raise ValueError(
                    f"prefix_lengths given, but no layer of this model reads a prefix (layer "
                    f"{self.config.layer!r} is causal); pass prefix_lengths=None")
            prefix_lengths = check_prefix_lengths(prefix_lengths, batch, steps, tokens.device)

        logits, new_state, hidden, _ = self._run(tokens, state, lengths, prefix_lengths)
        if return_hidden:
            return logits, new_state, hidden
        return logits, new_state

    def _check_call(self, tokens, state, lengths):
        """Validate a sequence call's tokens, state (None -> one None per block) and lengths."""
        self._check_tokens(tokens, dims=2, shape="(batch, time)")
        if state is None:
            state = (None,) * len(self.blocks)
        else:
            self._check_state_arity(state)
        return state, check_lengths(lengths, tokens.shape[0], tokens.shape[1], tokens.device)

    def _run(self, tokens, state, lengths, prefix_lengths, over_time=False):
        """The forward on validated arguments: logits, state, hidden, states over time (or
        None)."""
        x = self.dropout(self.embedding(tokens))
        new_state, steps = [], []
        for block, block_state in zip(self.blocks, state):
            out = block(x, block_state, lengths, prefix_lengths, over_time)
            x, block_state = out[0], out[1]
            new_state.append(block_state)
            if over_time:
                steps.append(out[2])
        hidden = self.norm(x)
        if lengths is not None:
            hidden = hidden * time_mask(lengths, tokens.shape[1]).unsqueeze(-1).to(hidden.dtype)
        logits = row_exact.linear(hidden, self.head.weight)
        return logits, tuple(new_state), hidden, (tuple(steps) if over_time else None)

    @property
    def states_over_time(self) -> bool:
        """Whether :meth:`forward_states` serves (every block's layer has ``forward_states``)."""
        return all(block.mixer.states_over_time and not block.reads_prefix
                   for block in self.blocks)

    def forward_states(self, tokens: torch.Tensor, state: ModelState | None = None,
                       lengths: torch.Tensor | Sequence[int] | None = None):
        """``logits, state, states``: :meth:`forward` plus the model's state after every
        position; ``state_at(states, b, t)`` is row b's state after its token t (t below its
        length). Under row-exact inference it is bitwise the state ``step`` reaches there.
        Decoding commits a verified path with it instead of running the path again. Needs
        :attr:`states_over_time`."""
        if not self.states_over_time:
            raise ValueError(f"layer {self.config.layer!r} does not return its states over "
                             "time (states_over_time is False); use forward()")
        state, lengths = self._check_call(tokens, state, lengths)
        logits, new_state, _, over_time = self._run(tokens, state, lengths, None, True)
        return logits, new_state, over_time

    def state_at(self, states, rows, times) -> ModelState:
        """The model state after position ``times[i]`` of row ``rows[i]`` (from
        :meth:`forward_states`), a state of ``len(rows)`` rows."""
        return tuple(block.mixer.state_at(s, rows, times) for block, s in zip(self.blocks, states))

    def step(self, token: torch.Tensor, state: ModelState | None = None):
        """One token per row: ``token`` (B,) -> ``logits`` (B, vocab_size), ``state``."""
        self._check_tokens(token, dims=1, shape="(batch,)")
        if state is None:
            state = self.init_state(token.shape[0], device=token.device)
        else:
            self._check_state_arity(state)
        x = self.dropout(self.embedding(token))
        new_state = []
        for block, block_state in zip(self.blocks, state):
            x, block_state = block.step(x, block_state)
            new_state.append(block_state)
        return row_exact.linear(self.norm(x), self.head.weight), tuple(new_state)

    def _check_tokens(self, tokens, dims: int, shape: str) -> None:
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != dims:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be a tensor of shape {shape}, got {got}")
        if tokens.dtype not in (torch.long, torch.int32):
            raise ValueError(f"tokens must hold integers (torch.long), got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0
                               or int(tokens.max()) >= self.config.vocab_size):
            raise ValueError(
                f"tokens must lie in [0, {self.config.vocab_size - 1}] (vocab_size "
                f"{self.config.vocab_size}), got values in [{int(tokens.min())}, "
                f"{int(tokens.max())}]"
            )

    def config_dict(self) -> dict[str, Any]:
        """A JSON-ready config that :func:`recurra.models.build_model` turns back into this model."""
        return {"architecture": "recurrent", **asdict(self.config)}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
