"""The layer contract every recurra layer follows.

- Batch-first: ``y, state = layer(x, state=None, lengths=None)`` with ``x`` of shape (B, T, D).
- ``y_t, state = layer.step(x_t, state)`` advances one step (``x_t`` of shape (B, D)).
- ``layer.init_state(batch_size)`` gives the state of an empty sequence.
- A state is an immutable tuple of tensors; passing it back continues the sequence exactly.
  Every tensor of a state carries the batch on axis ``layer.state_batch_dim`` (0 unless a layer
  keeps torch.nn's layout, as the classic cells do with axis 1).
- With ``lengths`` (B,), row b reads only ``x[b, :lengths[b]]``: padding never touches the state,
  the returned state of row b is the one after ``lengths[b]`` steps, and ``y[b, lengths[b]:]`` is 0.

Subclasses implement ``_forward(x, state, lengths)`` (arguments already validated: ``state`` is a
tuple of the right shapes, ``lengths`` is None or a long tensor on x's device) and
``state_shapes(batch_size)``. They may override ``init_state`` when the empty state is not zeros.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

State = tuple[torch.Tensor, ...]


class RecurrentLayer(nn.Module):
    """Base class of all recurra layers (see the module docstring for the contract)."""

    #: size of the last axis of ``x``
    input_size: int
    #: size of the last axis of ``y``
    output_size: int
    #: axis of the batch in every state tensor
    state_batch_dim: int = 0
    #: False for layers that see the future (bidirectional, non-causal); ``step`` then raises
    causal: bool = True
    #: True for layers that read a prefix of each sequence in both directions and are causal
    #: after it (jrt); RecurrentLM passes them ``prefix_lengths``
    causal_after_prefix: bool = False
    #: True for layers whose small inference calls are row-exact (``recurra.ops.row_exact``):
    #: every row bitwise the same whatever the other rows, so ``step`` equals a many-row forward
    row_exact: bool = False
    #: True for layers with ``forward_states`` (the state after every step) and ``state_at``
    states_over_time: bool = False

    # ----------------------------------------------------------------- subclass interface
    def state_shapes(self, batch_size: int) -> list[tuple[int, ...]]:
        raise NotImplementedError

    def _forward(
        self, x: torch.Tensor, state: State, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, State]:
        raise NotImplementedError

    # ----------------------------------------------------------------- public API
    def init_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> State:
        """The state of an empty sequence (zeros unless a layer says otherwise)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        ref = _reference_tensor(self)
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        return tuple(
            torch.zeros(shape, device=device, dtype=dtype)
            for shape in self.state_shapes(batch_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        state: State | None = None,
        lengths: torch.Tensor | Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, State]:
        state, lengths = self.check_call(x, state, lengths)
        return self._forward(x, state, lengths)

    def forward_states(self, x: torch.Tensor, state: State | None = None, lengths=None):
        """``y, state, states``: the forward plus the state after every step (layers with
        ``states_over_time``; see ``StackedRNN.forward_states``)."""
        raise ValueError(f"{type(self).__name__} does not return its states over time "
                         "(states_over_time is False)")

    def state_at(self, states, rows, times) -> State:
        """Row ``rows[i]``'s state after its step ``times[i]``, from ``forward_states``."""
        raise ValueError(f"{type(self).__name__} does not return its states over time "
                         "(states_over_time is False)")

    def check_call(self, x: torch.Tensor, state: State | None, lengths
                   ) -> tuple[State, torch.Tensor | None]:
        """Validate forward's arguments: the state (a fresh one if None) and the lengths (a
        tensor on x's device, or None)."""
        check_input(x, self.input_size)
        batch, steps = x.shape[0], x.shape[1]
        if state is None:
            state = self.init_state(batch, device=x.device, dtype=x.dtype)
        else:
            state = self.check_state(state, x)
        return state, check_lengths(lengths, batch, steps, x.device)

    def step(self, x_t: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """One step: ``x_t`` (B, D) -> ``y_t`` (B, D_out) and the next state."""
        if not self.causal:
            raise ValueError(
                f"{type(self).__name__} is not causal (it reads the future), so it has no step()"
            )
        if not isinstance(x_t, torch.Tensor) or x_t.dim() != 2:
            shape = tuple(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise ValueError(
                f"x_t must have shape (batch, {self.input_size}) for step(), got {shape}"
            )
        y, state = self.forward(x_t.unsqueeze(1), state)
        return y.squeeze(1), state

    def check_state(self, state: State, x: torch.Tensor) -> State:
        """Validate a user-supplied state against input ``x``; returns it as a tuple."""
        if isinstance(state, torch.Tensor):
            state = (state,)
        if not isinstance(state, (tuple, list)) or not all(
            isinstance(s, torch.Tensor) for s in state
        ):
            raise ValueError(
                f"state must be a tuple of tensors (as returned by the layer), got {type(state)}"
            )
        shapes = self.state_shapes(x.shape[0])
        if len(state) != len(shapes):
            raise ValueError(
                f"state must hold {len(shapes)} tensors of shapes {shapes}, got {len(state)}"
            )
        for i, (s, shape) in enumerate(zip(state, shapes)):
            if tuple(s.shape) != tuple(shape):
                raise ValueError(
                    f"state[{i}] must have shape {tuple(shape)} for a batch of {x.shape[0]} "
                    f"(batch on axis {self.state_batch_dim}), got {tuple(s.shape)}"
                )
            if s.dtype != x.dtype:
                raise ValueError(f"state[{i}] must have dtype {x.dtype} like x, got {s.dtype}")
            if s.device != x.device:
                raise ValueError(f"state[{i}] must be on {x.device} like x, got {s.device}")
        return tuple(state)

    def reorder_state(self, state: State, index: torch.Tensor) -> State:
        """Select (and repeat) batch rows of a state: row i of the result is row index[i]."""
        return tuple(s.index_select(self.state_batch_dim, index) for s in state)


# --------------------------------------------------------------------- validation helpers
def check_input(x: torch.Tensor, features: int, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape (batch, time, {features}), "
                         f"got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(
            f"{name} must have shape (batch, time, {features}) (3 dimensions, batch first), "
            f"got {x.dim()} dimensions: {tuple(x.shape)}"
        )
    if x.shape[-1] != features:
        raise ValueError(
            f"{name} must have {features} features on its last axis, got shape {tuple(x.shape)}"
        )
    if x.shape[0] < 1:
        raise ValueError(f"{name} must hold at least one sequence, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_lengths(
    lengths: torch.Tensor | Sequence[int] | None, batch: int, steps: int, device: torch.device
) -> torch.Tensor | None:
    """Validate ``lengths``: integers in [0, steps], one per row. Returns a long tensor or None."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(
            f"lengths must have shape ({batch},) (one length per sequence), "
            f"got {tuple(lengths.shape)}"
        )
    if lengths.is_floating_point() or lengths.is_complex():
        raise ValueError(f"lengths must hold integers, got {lengths.dtype}")
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
        raise ValueError(
            f"lengths must lie in [0, {steps}] (the time axis of x), "
            f"got values in [{int(lengths.min())}, {int(lengths.max())}]"
        )
    return lengths.to(device=device, dtype=torch.long)


def time_mask(lengths: torch.Tensor, steps: int) -> torch.Tensor:
    """Bool mask (B, T): True where t < lengths[b]."""
    return torch.arange(steps, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def run_in_blocks(forward, x: torch.Tensor, state, lengths: torch.Tensor | None,
                  block: int, multiple: int = 1):
    """``forward(x, state, lengths)`` over consecutive time blocks of ``block`` steps (rounded
    down to a multiple of ``multiple``, e.g. whole chunks of a chunked form, and at least one
    multiple), the state carried from block to block; returns the concatenated outputs and the
    final state.

    The layer contract (one pass == chunks with the state carried; padding never touches the
    state) makes this the same function as one pass: each row's ``lengths`` are clamped to the
    block, 0 for the blocks past its end, through which its state passes unchanged. Layers use
    it to keep the temporaries of long inputs small.
    """
    block = max(multiple, block // multiple * multiple)
    t = x.shape[1]
    if t <= block:
        return forward(x, state, lengths)
    ys = []
    for start in range(0, t, block):
        part = None if lengths is None else (lengths - start).clamp(0, block)
        # contiguous: the layer's projections would each copy the strided slice otherwise
        y, state = forward(x[:, start:start + block].contiguous(), state, part)
        ys.append(y)
    return torch.cat(ys, 1), state


def reverse_padded(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse each row's first ``lengths[b]`` steps along axis 1, leaving the padding in place.

    Used by bidirectional layers: the backward direction of row b starts at its last real step.
    """
    if lengths is None:
        return x.flip(1)
    steps = x.shape[1]
    t = torch.arange(steps, device=x.device).unsqueeze(0)
    src = torch.where(t < lengths.unsqueeze(1), lengths.unsqueeze(1) - 1 - t, t)
    index = src.view(*src.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, index)


def _reference_tensor(module: nn.Module) -> torch.Tensor:
    for p in module.parameters():
        return p
    for b in module.buffers():
        return b
    return torch.empty(0)
