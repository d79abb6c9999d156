"""Assembled networks: :class:`RecurrentLM` and ``build_model(config)``.

A model config is a plain dict (JSON-ready) with an ``"architecture"`` key:
``"recurrent"`` (default) -> :class:`RecurrentLM`, ``"transformer"`` ->
``recurra.models.transformer_lm.TransformerLM``, ``"llama"`` -> ``recurra.models.llama.LlamaLM``
(a port of transformers' ``LlamaForCausalLM``); the other keys are the constructor's arguments.
``RecurrentLM.config_dict()`` returns such a dict.
"""

from __future__ import annotations

import importlib
from typing import Any

from .recurrent_lm import RecurrentLM, RecurrentLMConfig

#: architecture name -> (module, class); modules are imported only when asked for
ARCHITECTURES = {
    "recurrent": ("recurra.models.recurrent_lm", "RecurrentLM"),
    "transformer": ("recurra.models.transformer_lm", "TransformerLM"),
    "llama": ("recurra.models.llama", "LlamaLM"),
}


def build_model(config: dict[str, Any]):
    """Build a model from its config dict (see the module docstring)."""
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    options = dict(config)
    architecture = options.pop("architecture", "recurrent")
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        )
    module_name, class_name = ARCHITECTURES[architecture]
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(**options)


def model_config(model) -> dict[str, Any]:
    """The config dict of a model built by :func:`build_model` (inverse of it)."""
    if hasattr(model, "config_dict"):
        return model.config_dict()
    config = model.config
    if not isinstance(config, dict):
        from dataclasses import asdict, is_dataclass

        if not is_dataclass(config):
            raise ValueError(f"{type(model).__name__}.config must be a dict or a dataclass")
        config = asdict(config)
    config = dict(config)
    for name, (_, class_name) in ARCHITECTURES.items():
        if type(model).__name__ == class_name:
            config.setdefault("architecture", name)
    return config


__all__ = ["ARCHITECTURES", "RecurrentLM", "RecurrentLMConfig", "build_model", "model_config"]
