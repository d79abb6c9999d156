"""What the two KV-cache sessions share (:mod:`~recurra.decode.kv_cache_adapter` for our
``TransformerLM`` and :mod:`~recurra.decode.hf_adapter` for transformers causal LMs).

A :class:`KVSession` absorbs tokens by running the model over them with its cache; verifying a
draft tree runs every node at once with the committed prefix plus the node's ancestors visible
(``tree_mask``, bool (n, L + n)) at positions ``L + depth``; a chain needs neither (the model's own
causal mask is the same thing). Subclasses say how to run the model (:meth:`_run`), how to keep a
committed path's keys and values (:meth:`_keep`) and how to reorder rows (:meth:`_reorder`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence

import torch

from .protocol import DecodeSession
from .tree import DraftTree


class KVSession(DecodeSession):
    def __init__(self, adapter):
        self.adapter = adapter
        self.model = adapter.model
        self.length = 0
        self.batch_size = 1
        self._tree: DraftTree | None = None

    @abstractmethod
    def _run(self, tokens: torch.Tensor, return_hidden: bool, logits_to_keep: int = 0,
             tree_mask: torch.Tensor | None = None, positions: torch.Tensor | None = None):
        """Run ``tokens`` (B, T) with the cache (which grows by T); logits (and hidden)."""

    @abstractmethod
    def _keep(self, start: int, path: list[int]) -> None:
        """Keep cache slots ``[:start]`` followed by ``start + path[j]``; drop the rest."""

    @abstractmethod
    def _reorder(self, index: torch.Tensor) -> None:
        """Select (and repeat) the cache's batch rows."""

    @torch.no_grad()
    def append(self, tokens, return_hidden=False, logits_to_keep=0):
        if self.length == 0:
            self.batch_size = tokens.shape[0]
        out = self._run(tokens, return_hidden, logits_to_keep)
        self.length += tokens.shape[1]
        self._tree = None
        return out

    @torch.no_grad()
    def verify(self, tree: DraftTree, return_hidden=False):
        if self.batch_size != 1:
            raise ValueError(f"verify() needs a batch of 1, the session holds {self.batch_size}")
        n = len(tree)
        run = tree.padded(self.adapter.padded_size(n))
        device = self.adapter.device
        tokens = torch.tensor([run.tokens], device=device)
        if run.is_chain:
            out = self._run(tokens, return_hidden)
        else:
            mask = torch.ones(len(run), self.length + len(run), dtype=torch.bool, device=device)
            mask[:, self.length:] = run.ancestor_mask(device)
            positions = self.length + torch.tensor(run.depth, device=device)
            out = self._run(tokens, return_hidden, tree_mask=mask, positions=positions)
        self._tree = tree
        if return_hidden:
            return out[0][0, :n], out[1][0, :n]
        return out[0, :n]

    def commit(self, path: Sequence[int]) -> None:
        path = self.check_path(self._tree, path)
        self._keep(self.length, path)
        self.length += len(path)
        self._tree = None

    def reorder(self, index: torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long, device=self.adapter.device)
        if index.numel() == self.batch_size and bool(
                (index == torch.arange(self.batch_size, device=index.device)).all()):
            return  # identity: nothing to copy
        self._reorder(index)
        self.batch_size = int(index.numel())
