"""Adapter for recurrent-state models (:class:`~recurra.models.recurrent_lm.RecurrentLM`).

A recurrent model has no cache to crop: a state is an immutable snapshot, so branching is free
(keep the old tuple) and restoring is an assignment. Verifying a draft tree branches the state:

- ``mode="levels"``: the tree is run level by level, one batched ``step`` per depth; the rows of
  level d start from their parents' states (``reorder_state``). Every node's state is kept, so
  committing a path just selects the state of its last node (no recomputation).
- ``mode="unroll"``: every root-to-leaf path becomes a batch row (padded, with ``lengths``) run
  in one ``forward`` from the broadcast state (in groups of at most
  ``recurra.ops.row_exact.EXACT_ROWS`` tokens). A model with ``states_over_time``
  (``RecurrentLM`` of classic cells) returns its state after every position
  (``forward_states``), so committing selects the accepted node's state; other models replay the
  accepted path from the committed state ("activation replay"). One call per tree instead of
  one per depth.
- ``mode="auto"`` (default): ``unroll`` when the model is row-exact (``model.row_exact``, see
  ``recurra.ops.row_exact``: the classic cells under ``backend="auto"`` on the CPU), else
  ``levels``.

Lossless verification compares the verifier's logits with greedy decoding's, which come from
``step``. For a row-exact model every row of a verify call gets bitwise the logits ``step`` gives
it, in either mode, so speculative output equals greedy output by construction. For other models
(e.g. Mamba-2, linear attention) a batched call can differ from ``step`` in the last bits, in
either mode; identical outputs are then checked (the tests, the benchmark), not guaranteed.

A nonlinear recurrence needs one sequential update per depth either way: tree verification
saves forward passes (and Python overhead), not sequential depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..ops.row_exact import EXACT_ROWS
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
        #: after verify: node -> the state after it (None: commit replays the path)
        self._state_of = None

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
        if self.adapter.mode == "unroll":
            logits, hidden = self._verify_unrolled(tree, return_hidden)
        else:
            logits, hidden = self._verify_levels(tree, return_hidden)
        self._tree = tree
        return (logits, hidden) if return_hidden else logits

    def _verify_unrolled(self, tree: DraftTree, return_hidden: bool):
        """Every root-to-leaf path a batch row (a chain: one row), in calls of at most
        EXACT_ROWS tokens. With a model that returns its states over time, every node's state
        is kept for commit; otherwise commit replays the accepted path."""
        n = len(tree)
        over_time = (not return_hidden) and getattr(self.model, "states_over_time", False)
        if tree.is_chain:
            paths = [list(range(n))]
        else:
            paths = [tree.path_to(leaf) for leaf in range(n) if not tree.children[leaf]]
        width = max(len(p) for p in paths)
        per_call = max(1, EXACT_ROWS // width)  # row-exact calls hold <= EXACT_ROWS tokens
        where = [None] * n  # node -> (call, row, position) of its first occurrence
        outs, hiddens, group_states = [], [], []
        for start in range(0, len(paths), per_call):
            group = paths[start:start + per_call]
            tokens = torch.zeros(len(group), width, dtype=torch.long)
            for r, p in enumerate(group):
                tokens[r, :len(p)] = torch.tensor([tree.tokens[i] for i in p])
                for t, node in enumerate(p):
                    if where[node] is None:
                        where[node] = (len(outs), r, t)
            lengths = (None if all(len(p) == width for p in group)
                       else torch.tensor([len(p) for p in group]))
            state = self._state_rows(len(group))
            if over_time:
                out, _, states = self.model.forward_states(tokens, state, lengths)
                group_states.append(states)
            else:
                out, _, hid = self._forward(tokens, state, return_hidden, lengths)
                hiddens.append(hid)
            outs.append(out)
        index = torch.tensor(where)  # (n, 3)
        flat = index[:, 0] * (per_call * width) + index[:, 1] * width + index[:, 2]

        def gather(parts):  # rows of every call's (rows, width, ...) output, node by node
            parts = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, per_call - p.shape[0]))
                     for p in parts] if len(parts) > 1 else parts
            return torch.cat(parts).flatten(0, 1)[flat]
        logits = gather(outs)
        hidden = gather(hiddens) if return_hidden else None
        if over_time:
            self._state_of = lambda node: self.model.state_at(
                group_states[where[node][0]], [where[node][1]], [where[node][2]])
        else:
            self._state_of = None  # commit replays the accepted path
        return logits, hidden

    def _verify_levels(self, tree: DraftTree, return_hidden: bool):
        """One batched step per depth, every row from its parent's state; every node's state
        is kept for commit."""
        n = len(tree)
        logits = [None] * n
        hidden = [None] * n if return_hidden else None
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
        self._state_of = lambda node: self.model.reorder_state(
            level_states[depth[node]], torch.tensor([row_of[node]]))
        return torch.stack(logits), (torch.stack(hidden) if return_hidden else None)

    @torch.no_grad()
    def commit(self, path: Sequence[int]) -> None:
        path = self.check_path(self._tree, path)
        if path:
            if self._state_of is not None:
                self.state = self._state_of(path[-1])
            else:  # replay the accepted path from the committed state
                tokens = torch.tensor([[self._tree.tokens[i] for i in path]])
                _, self.state, _ = self._forward(tokens, self._state_rows(1), False)
        self.length += len(path)
        self._tree = None
        self._state_of = None

    def snapshot(self):
        return (self.state, self.length, self.batch_size)

    def restore(self, snapshot) -> None:
        self.state, self.length, self.batch_size = snapshot
        self._tree = None
        self._state_of = None

    def reorder(self, index: torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long)
        self.state = self.model.reorder_state(self.state, index)
        self.batch_size = int(index.numel())


class RecurrentAdapter(DecodeAdapter):
    """Wraps a model with ``init_state``, ``reorder_state``, ``step`` and a stateful forward.

    ``mode``: "auto" (default), "unroll" or "levels" (module docstring); ``self.mode`` is the
    mode in use ("auto" resolved), ``self.exact`` whether the model is row-exact."""

    def __init__(self, model, mode: str = "auto"):
        if mode not in ("auto", "levels", "unroll"):
            raise ValueError(f"mode must be 'auto', 'levels' or 'unroll', got {mode!r}")
        self.model = model
        #: the model's verify calls give every row bitwise what ``step`` gives it
        self.exact = bool(getattr(model, "row_exact", False))
        self.mode = ("unroll" if self.exact else "levels") if mode == "auto" else mode
        self.vocab_size = model_vocab_size(model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_session(self) -> RecurrentSession:
        return RecurrentSession(self)
