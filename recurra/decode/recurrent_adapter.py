"""Adapter for recurrent-state models (:class:`~recurra.models.recurrent_lm.RecurrentLM`).

A recurrent model has no cache to crop: a state is an immutable snapshot, so branching is free
(keep the old tuple) and restoring is an assignment. Verifying a draft tree branches the state:

- ``mode="levels"`` (default): the tree is run level by level, one batched ``step`` per depth; the
  rows of level d start from their parents' states (``reorder_state``). Every node's state is
  kept, so committing a path just selects the state of its last node (no recomputation).
- ``mode="unroll"``: every root-to-leaf path becomes a batch row (padded, with ``lengths``) run
  in one ``forward`` from the broadcast state; committing replays the accepted path from the
  committed state ("activation replay").

A nonlinear recurrence needs one sequential update per depth either way: tree verification
saves forward passes (and Python overhead), not sequential depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .protocol import DecodeAdapter, DecodeSession, model_vocab_size
from .tree import DraftTree


class RecurrentSession(DecodeSession):
    def __init__(self, adapter: RecurrentAdapter):
        self.adapter = adapter
        self.model = adapter.model
        self.state = None
        self.length = 0
        self.batch_size = 1
        self._tree: DraftTree | None = None
        self._node_states = None  # levels mode: per node (level, row) + per-level states

    def _forward(self, tokens, state, return_hidden, lengths=None):
        if tokens.shape[1] == 1 and not return_hidden and lengths is None:
            logits, state = self.model.step(tokens[:, 0], state)
            return logits.unsqueeze(1), state, None
        out = self.model(tokens, state, lengths=lengths, return_hidden=return_hidden)
        return out[0], out[1], (out[2] if return_hidden else None)

    @torch.no_grad()
    def append(self, tokens, return_hidden=False, logits_to_keep=0):
        if self.state is None:
            self.batch_size = tokens.shape[0]
        logits, self.state, hidden = self._forward(tokens, self.state, return_hidden)
        self.length += tokens.shape[1]
        self._tree = None
        if logits_to_keep:
            logits = logits[:, -logits_to_keep:]
            hidden = hidden[:, -logits_to_keep:] if hidden is not None else None
        return (logits, hidden) if return_hidden else logits

    def _state_rows(self, rows: int):
        if self.state is None:
            return self.model.init_state(rows)
        return self.model.reorder_state(self.state, torch.zeros(rows, dtype=torch.long))

    @torch.no_grad()
    def verify(self, tree: DraftTree, return_hidden=False):
        if self.batch_size != 1:
            raise ValueError(f"verify() needs a batch of 1, the session holds {self.batch_size}")
        n = len(tree)
        logits = [None] * n
        hidden = [None] * n if return_hidden else None
        unroll = self.adapter.mode == "unroll"
        if unroll and not tree.is_chain:
            leaves = [i for i in range(n) if not tree.children[i]]
            paths = [tree.path_to(leaf) for leaf in leaves]
            width = max(len(p) for p in paths)
            tokens = torch.zeros(len(paths), width, dtype=torch.long)
            for r, p in enumerate(paths):
                tokens[r, :len(p)] = torch.tensor([tree.tokens[i] for i in p])
            lengths = torch.tensor([len(p) for p in paths])
            out, _, hid = self._forward(tokens, self._state_rows(len(paths)), return_hidden,
                                        lengths)
            for r, p in enumerate(paths):
                for t, node in enumerate(p):
                    if logits[node] is None:
                        logits[node] = out[r, t]
                        if return_hidden:
                            hidden[node] = hid[r, t]
            self._node_states = None
        elif unroll:  # a chain: one forward, the accepted prefix is replayed at commit
            tokens = torch.tensor([tree.tokens])
            out, _, hid = self._forward(tokens, self._state_rows(1), return_hidden)
            logits = list(out[0])
            if return_hidden:
                hidden = list(hid[0])
            self._node_states = None  # committing a chain replays its prefix
        else:
            depth = tree.depth
            levels: dict[int, list[int]] = {}
            for i, d in enumerate(depth):
                levels.setdefault(d, []).append(i)
            row_of = {}
            level_states = []
            prev_state = self._state_rows(1)
            for d in sorted(levels):
                nodes = levels[d]
                parent_rows = torch.tensor([row_of[tree.parents[i]] if d else 0 for i in nodes])
                state = self.model.reorder_state(prev_state, parent_rows)
                tokens = torch.tensor([[tree.tokens[i]] for i in nodes])
                out, state, hid = self._forward(tokens, state, return_hidden)
                for r, node in enumerate(nodes):
                    row_of[node] = r
                    logits[node] = out[r, 0]
                    if return_hidden:
                        hidden[node] = hid[r, 0]
                level_states.append(state)
                prev_state = state
            self._node_states = (row_of, depth, level_states)
        self._tree = tree
        logits = torch.stack(logits)
        return (logits, torch.stack(hidden)) if return_hidden else logits

    @torch.no_grad()
    def commit(self, path: Sequence[int]) -> None:
        path = self.check_path(self._tree, path)
        if path:
            if self._node_states is not None:
                row_of, depth, level_states = self._node_states
                last = path[-1]
                self.state = self.model.reorder_state(level_states[depth[last]],
                                                      torch.tensor([row_of[last]]))
            else:  # replay the accepted path from the committed state
                tokens = torch.tensor([[self._tree.tokens[i] for i in path]])
                _, self.state, _ = self._forward(tokens, self._state_rows(1), False)
        self.length += len(path)
        self._tree = None
        self._node_states = None

    def snapshot(self):
        return (self.state, self.length, self.batch_size)

    def restore(self, snapshot) -> None:
        self.state, self.length, self.batch_size = snapshot
        self._tree = None
        self._node_states = None

    def reorder(self, index: torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long)
        self.state = self.model.reorder_state(self.state, index)
        self.batch_size = int(index.numel())


class RecurrentAdapter(DecodeAdapter):
    """Wraps a model with ``init_state``, ``reorder_state``, ``step`` and a stateful forward."""

    def __init__(self, model, mode: str = "levels"):
        if mode not in ("levels", "unroll"):
            raise ValueError(f"mode must be 'levels' or 'unroll', got {mode!r}")
        self.model = model
        self.mode = mode
        self.vocab_size = model_vocab_size(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_session(self) -> RecurrentSession:
        return RecurrentSession(self)
