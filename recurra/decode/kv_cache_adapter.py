"""Adapter for KV-cache transformers with our forward contract (:class:`TransformerLM`).

The session keeps the model's cache tuple. Verifying a draft tree appends all its nodes with the
ancestor mask and positions ``L + depth``; committing a path moves the path's keys and values to
contiguous slots ``L, L+1, ...`` and drops the rest (a chain is simply cropped).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.transformer_lm import compact_cache, crop_cache, reorder_cache
from .protocol import DecodeAdapter, DecodeSession, model_vocab_size
from .tree import DraftTree


class KVCacheSession(DecodeSession):
    def __init__(self, adapter: KVCacheAdapter):
        self.adapter = adapter
        self.model = adapter.model
        self.cache = None
        self.length = 0
        self.batch_size = 1
        self._tree: DraftTree | None = None

    def _run(self, tokens, return_hidden, logits_to_keep=0, **kw):
        out = self.model(tokens, self.cache, return_hidden=return_hidden,
                         logits_to_keep=logits_to_keep, **kw)
        self.cache = out[1]
        return (out[0], out[2]) if return_hidden else out[0]

    @torch.no_grad()
    def append(self, tokens, return_hidden=False, logits_to_keep=0):
        if self.cache is None:
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
            mask = torch.cat((torch.ones(len(run), self.length, dtype=torch.bool, device=device),
                              run.ancestor_mask(device)), dim=1).unsqueeze(0)
            positions = self.length + torch.tensor(run.depth, device=device)
            out = self._run(tokens, return_hidden, position_ids=positions, attention_mask=mask)
        self._tree = tree
        if return_hidden:
            return out[0][0, :n], out[1][0, :n]
        return out[0, :n]

    def commit(self, path: Sequence[int]) -> None:
        path = self.check_path(self._tree, path)
        if path == list(range(len(path))):
            self.cache = crop_cache(self.cache, self.length + len(path))
        else:
            self.cache = crop_cache(compact_cache(self.cache, self.length, path),
                                    self.length + len(path))
        self.length += len(path)
        self._tree = None

    def snapshot(self):
        return (self.cache, self.length, self.batch_size)

    def restore(self, snapshot) -> None:
        self.cache, self.length, self.batch_size = snapshot
        self._tree = None

    def reorder(self, index: torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long, device=self.adapter.device)
        self.cache = reorder_cache(self.cache, index)
        self.batch_size = int(index.numel())


class KVCacheAdapter(DecodeAdapter):
    """Wraps a model with ``logits, cache = model(tokens, cache, position_ids, attention_mask)``."""

    def __init__(self, model, verify_sizes: Sequence[int] | None = None):
        self.model = model
        self.vocab_size = model_vocab_size(model)
        self.verify_sizes = verify_sizes

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def new_session(self) -> KVCacheSession:
        return KVCacheSession(self)
