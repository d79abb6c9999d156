"""Adapter for transformers ``PreTrainedModel`` causal LMs (transformers is optional).

The session holds a ``DynamicCache``. Chains (prompt lookup, plain steps) run with the model's
own causal mask; a draft tree runs with a 4-D boolean mask (prefix + ancestor mask) and
``position_ids = L + depth``, which transformers passes through unchanged. Committing a path
moves the path's keys/values to contiguous slots in every layer and crops the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .protocol import DecodeAdapter, DecodeSession
from .tree import DraftTree


def _cache_layers(cache):
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise ValueError(f"unsupported cache type {type(cache).__name__}: need a transformers "
                         f"Cache with .layers (transformers >= 4.56)")
    return layers


class HFSession(DecodeSession):
    def __init__(self, adapter: HFAdapter):
        from transformers import DynamicCache

        self.adapter = adapter
        self.model = adapter.model
        self.cache = DynamicCache(config=self.model.config)
        self.length = 0
        self.batch_size = 1
        self._tree: DraftTree | None = None

    def _run(self, tokens, return_hidden, logits_to_keep=0, **kw):
        kw[self.adapter.cache_argument] = self.cache  # updated in place
        out = self.model(input_ids=tokens, use_cache=True, output_hidden_states=return_hidden,
                         logits_to_keep=logits_to_keep, **kw)
        if return_hidden:
            hidden = out.hidden_states[-1]
            if logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            return out.logits, hidden
        return out.logits

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
            mask = torch.cat((torch.ones(len(run), self.length, dtype=torch.bool, device=device),
                              run.ancestor_mask(device)), dim=1)[None, None]
            positions = self.length + torch.tensor([run.depth], device=device)
            cache_position = torch.arange(self.length, self.length + len(run), device=device)
            out = self._run(tokens, return_hidden, attention_mask=mask, position_ids=positions,
                            cache_position=cache_position)
        self._tree = tree
        if return_hidden:
            return out[0][0, :n], out[1][0, :n]
        return out[0, :n]

    def commit(self, path: Sequence[int]) -> None:
        path = self.check_path(self._tree, path)
        start, keep = self.length, len(path)
        if path != list(range(keep)):
            index = start + torch.tensor(path, device=self.adapter.device)
            for layer in _cache_layers(self.cache):
                layer.keys = torch.cat((layer.keys[..., :start, :],
                                        layer.keys.index_select(-2, index)), dim=-2)
                layer.values = torch.cat((layer.values[..., :start, :],
                                          layer.values.index_select(-2, index)), dim=-2)
        total = self.cache.get_seq_length()
        if total > start + keep:
            self.cache.crop(start + keep - total)
        self.length += keep
        self._tree = None

    def snapshot(self):
        layers = _cache_layers(self.cache) if self.length else []
        return ([(layer.keys, layer.values) for layer in layers], self.length, self.batch_size)

    def restore(self, snapshot) -> None:
        from transformers import DynamicCache

        tensors, self.length, self.batch_size = snapshot
        if not self.length:
            self.cache = DynamicCache(config=self.model.config)
        else:  # the cache's tensors are replaced (never written in place) as it grows
            for layer, (k, v) in zip(_cache_layers(self.cache), tensors):
                layer.keys, layer.values = k, v
        self._tree = None

    def reorder(self, index: torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long, device=self.adapter.device)
        for layer in _cache_layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
        self.batch_size = int(index.numel())


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
