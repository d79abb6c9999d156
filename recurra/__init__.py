"""recurra: recurrent sequence models, first-class.

Subpackages: ``recurra.ops`` (the math), ``recurra.layers`` (modules with one contract),
``recurra.models``, ``recurra.decode``, ``recurra.tasks``, ``recurra.train``.
Importing ``recurra`` itself stays cheap: subpackages load on first use.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("ops", "layers", "models", "decode", "tasks", "train", "bench")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"recurra.{name}")
    raise AttributeError(f"module 'recurra' has no attribute {name!r}")
