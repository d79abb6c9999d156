"""The decoding protocol: what a model must offer the decoding engine.

Every strategy and speculative method is written against :class:`DecodeSession`, a model's
cache or recurrent state for a batch of rows, positioned after the tokens it has absorbed:

- ``append(tokens (B, T))`` absorbs tokens and returns their logits (B, T, V) (the last
  ``logits_to_keep`` positions only when > 0; prefill asks for 1);
- ``verify(tree)`` (batch 1) runs a :class:`~recurra.decode.tree.DraftTree` through the model in
  one pass *tentatively* and returns the logits of every node (n, V);
- ``commit(path)`` keeps, of the last verified tree, the nodes ``path`` (a root-to-node chain
  starting at node 0; an empty path keeps nothing);
- ``reorder(index)`` selects (and repeats) batch rows (beam search);
- ``snapshot()`` / ``restore(snapshot)`` go back to an earlier committed point (draft models).

Adapters turn models into sessions: :func:`as_adapter` picks the one for a model —
:class:`~recurra.decode.recurrent_adapter.RecurrentAdapter` (snapshot / branch / restore a
recurrent state), :class:`~recurra.decode.kv_cache_adapter.KVCacheAdapter` (our
:class:`~recurra.models.transformer_lm.TransformerLM`: crop / compact the cache, tree masks) and
:class:`~recurra.decode.hf_adapter.HFAdapter` (transformers ``PreTrainedModel`` causal LMs).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from .tree import DraftTree


class DecodeSession(ABC):
    """A model's cache / state for ``batch_size`` rows (see the module docstring)."""

    #: number of tokens absorbed (committed) so far
    length: int = 0
    batch_size: int = 1

    @abstractmethod
    def append(self, tokens: torch.Tensor, return_hidden: bool = False,
               logits_to_keep: int = 0):
        """Absorb ``tokens`` (B, T); returns logits (B, T', V) (and hidden (B, T', D))."""

    @abstractmethod
    def verify(self, tree: DraftTree, return_hidden: bool = False):
        """Tentatively absorb every node of ``tree``; returns logits (n, V) (and hidden)."""

    @abstractmethod
    def commit(self, path: Sequence[int]) -> None:
        """Keep the nodes ``path`` (root-to-node, starting at 0) of the last verified tree."""

    @abstractmethod
    def reorder(self, index: torch.Tensor) -> None:
        """Select (and repeat) batch rows: row i becomes row ``index[i]``."""

    def snapshot(self):
        """An opaque copy of the committed cache / state (cheap: tensors are not copied)."""
        raise NotImplementedError(f"{type(self).__name__} has no snapshot()")

    def restore(self, snapshot) -> None:
        """Return to a :meth:`snapshot` (drops everything absorbed since)."""
        raise NotImplementedError(f"{type(self).__name__} has no restore()")

    def check_path(self, tree: DraftTree | None, path: Sequence[int]) -> list[int]:
        if tree is None:
            raise ValueError("commit() needs a verify() first")
        path = [int(p) for p in path]
        if path and (path[0] != 0 or any(tree.parents[b] != a for a, b in zip(path, path[1:]))):
            raise ValueError(f"path must be a root-to-node chain of the verified tree starting at "
                             f"node 0, got {path}")
        return path


class DecodeAdapter(ABC):
    """Makes :class:`DecodeSession` objects for one model."""

    vocab_size: int
    #: a tree is padded with dummy leaves to this size before verification when that is cheaper
    #: on the hardware (see :mod:`recurra.decode.cost_model`); None = never pad
    verify_sizes: Sequence[int] | None = None

    @abstractmethod
    def new_session(self) -> DecodeSession:
        """An empty session (nothing absorbed) for one row; prefill with ``append``."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def padded_size(self, n: int) -> int:
        if not self.verify_sizes:
            return n
        return min((s for s in self.verify_sizes if s >= n), default=n)


def is_hf_model(model) -> bool:
    """True for a transformers ``PreTrainedModel`` (checked without importing transformers)."""
    return any(c.__module__.startswith("transformers.") and c.__name__ == "PreTrainedModel"
               for c in type(model).__mro__)


def as_adapter(model) -> DecodeAdapter:
    """The adapter for ``model``: an adapter passes through; transformers causal LMs, models
    with a KV-cache forward like :class:`~recurra.models.transformer_lm.TransformerLM`, and
    recurrent models (``init_state`` / ``reorder_state`` / ``step``) are wrapped."""
    if isinstance(model, DecodeAdapter):
        return model
    if is_hf_model(model):
        from .hf_adapter import HFAdapter
        return HFAdapter(model)
    if hasattr(model, "check_cache") and hasattr(model, "config"):
        from .kv_cache_adapter import KVCacheAdapter
        return KVCacheAdapter(model)
    if all(hasattr(model, a) for a in ("init_state", "reorder_state", "step")):
        from .recurrent_adapter import RecurrentAdapter
        return RecurrentAdapter(model)
    raise ValueError(
        f"model must be a recurrent model (init_state/reorder_state/step), a KV-cache model like "
        f"TransformerLM, a transformers PreTrainedModel or a DecodeAdapter; got "
        f"{type(model).__name__}")


def model_vocab_size(model) -> int:
    config = getattr(model, "config", None)
    v = getattr(config, "vocab_size", None)
    if v is None and isinstance(config, dict):
        v = config.get("vocab_size")
    if v is None:
        raise ValueError(f"cannot find vocab_size in {type(model).__name__}.config")
    return int(v)
