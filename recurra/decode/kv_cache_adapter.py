"""Adapter for KV-cache transformers with our forward contract (:class:`TransformerLM`).

The session keeps the model's cache tuple. Verifying a draft tree appends all its nodes with the
ancestor mask and positions ``L + depth``; committing a path moves the path's keys and values to
contiguous slots ``L, L+1, ...`` (in place, in the tensors the verify returned) and drops the rest
(a chain is simply cropped). The shared
append / verify / commit logic is :class:`~recurra.decode.kv_session.KVSession`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..models.transformer_lm import reorder_cache
from ..ops.kv_keep import keep_slots
from .kv_session import KVSession
from .protocol import DecodeAdapter, model_vocab_size


class KVCacheSession(KVSession):
    def __init__(self, adapter: KVCacheAdapter):
        super().__init__(adapter)
        self.cache = None

    def _run(self, tokens, return_hidden, logits_to_keep=0, tree_mask=None, positions=None):
        kw = {}
        if tree_mask is not None:
            kw = {"attention_mask": tree_mask[None], "position_ids": positions}
        out = self.model(tokens, self.cache, return_hidden=return_hidden,
                         logits_to_keep=logits_to_keep, **kw)
        self.cache = out[1]
        return (out[0], out[2]) if return_hidden else out[0]

    def _keep(self, start: int, path: list[int]) -> None:
        # in place, in the cache the last verify returned: fresh tensors of the model's, and
        # every slot from ``start`` on belongs to that verify's tree, so no committed state or
        # snapshot sees the change; a few slots are moved instead of the cache being copied
        self.cache = keep_slots(self.cache, start, path)

    def _reorder(self, index: torch.Tensor) -> None:
        self.cache = reorder_cache(self.cache, index)

    def snapshot(self):
        return (self.cache, self.length, self.batch_size)

    def restore(self, snapshot) -> None:
        self.cache, self.length, self.batch_size = snapshot
        self._tree = None


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
