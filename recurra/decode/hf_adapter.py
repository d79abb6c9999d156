"""Adapter for transformers ``PreTrainedModel`` causal LMs (transformers is optional).

The session holds a ``DynamicCache``. Chains (prompt lookup, plain steps) run with the model's
own causal mask; a draft tree runs with a 4-D boolean mask (prefix + ancestor mask) and
``position_ids = L + depth``, which transformers passes through unchanged. Committing a path
moves the path's keys/values to contiguous slots in every layer (in place: the slots past the
committed length belong to the tensors the verification just created) and crops the rest. The
shared append / verify / commit logic is :class:`~recurra.decode.kv_session.KVSession`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .kv_session import KVSession
from .protocol import DecodeAdapter


def _cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"unsupported cache type {type(cache).__name__}: need a transformers "
                         f"Cache with .layers (transformers >= 4.56)")
    return layers


class HFSession(KVSession):
    def __init__(self, adapter: HFAdapter):
        super().__init__(adapter)
        self.cache = self._new_cache()

    def _new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def _run(self, tokens, return_hidden, logits_to_keep=0, tree_mask=None, positions=None):
        kw = {self.adapter.cache_argument: self.cache}  # updated in place
        if tree_mask is not None:
            n = tokens.shape[1]
            kw.update(attention_mask=tree_mask[None, None], position_ids=positions[None],
                      cache_position=torch.arange(self.length, self.length + n,
                                                  device=tokens.device))
        out = self.model(input_ids=tokens, use_cache=True, output_hidden_states=return_hidden,
                         logits_to_keep=logits_to_keep, **kw)
        if return_hidden:
            hidden = out.hidden_states[-1]
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return out.logits, hidden
        return out.logits

    def _keep(self, start: int, path: list[int]) -> None:
        keep = len(path)
        first = next((j for j, p in enumerate(path) if p != j), keep)
        layers = _cache_layers(self.cache)
        if first < keep:
            index = start + torch.tensor(path[first:], device=self.adapter.device)
            for layer in layers:
                for t in (layer.keys, layer.values):
                    t[..., start + first:start + keep, :] = t.index_select(-2, index)
        total = self.cache.get_seq_length()
        if total > start + keep:
            self.cache.crop(start + keep - total)

    def _reorder(self, index: torch.Tensor) -> None:
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)

    def snapshot(self):
        layers = _cache_layers(self.cache) if self.length else []
        return ([(layer.keys, layer.values) for layer in layers], self.length, self.batch_size)

    def restore(self, snapshot) -> None:
        tensors, self.length, self.batch_size = snapshot
        if not self.length:
            self.cache = self._new_cache()
        else:  # the cache's tensors are replaced (by torch.cat) as it grows, so a snapshot's
            # tensors are never written: commit writes only slots past the committed length
            for layer, (k, v) in zip(_cache_layers(self.cache), tensors):
                layer.keys, layer.values = k, v
        self._tree = None


class HFAdapter(DecodeAdapter):
    """Wraps a transformers causal LM (``LlamaForCausalLM`` and friends)."""

    def __init__(self, model, verify_sizes: Sequence[int] | None = None):
        self.model = model
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.verify_sizes = verify_sizes
        import inspect

        # transformers 5.2x renamed ``past_key_values`` to ``cache``
        params = inspect.signature(model.forward).parameters
        self.cache_argument = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return self.model.device

    def new_session(self) -> HFSession:
        return HFSession(self)
