"""Recurrent layers with one contract (see ``recurra.layers.base``), registered by name.

``build(name, d_model=..., **options)`` returns a layer mapping (B, T, d_model) to
(B, T, d_model); ``available()`` lists the names. The torch-style classes ``LSTM``, ``GRU``,
``RNN`` and ``SLSTM`` follow torch.nn's argument names and gate order.
"""

from .base import RecurrentLayer, State, check_input, check_lengths, reverse_padded, time_mask
from .registry import available, build, describe, register

_CLASSES = {"LSTM": "lstm", "GRU": "gru", "RNN": "elman", "SLSTM": "slstm",
            "from_torch": "recurrent_stack"}


def __getattr__(name):
    if name in _CLASSES:
        import importlib

        return getattr(importlib.import_module(f"recurra.layers.{_CLASSES[name]}"), name)
    raise AttributeError(f"module 'recurra.layers' has no attribute {name!r}")


__all__ = [
    "RecurrentLayer", "State", "available", "build", "describe", "register", "check_input",
    "check_lengths", "reverse_padded", "time_mask", "LSTM", "GRU", "RNN", "SLSTM", "from_torch",
]
