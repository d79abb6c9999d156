"""Layers by name: ``build(name, d_model=..., **options)`` and ``available()``.

A layer module registers a factory with ``@register("name", "one-line description")``. Every
module of the ``recurra.layers`` package is imported the first time the registry is read, so a new
layer file registers itself without editing any other file.
"""

from __future__ import annotations

import importlib
import pkgutil
import warnings
from dataclasses import dataclass
from typing import Callable

from .base import RecurrentLayer


@dataclass(frozen=True)
class LayerEntry:
    name: str
    description: str
    factory: Callable[..., RecurrentLayer]


_REGISTRY: dict[str, LayerEntry] = {}
_BROKEN: dict[str, str] = {}
_discovered = False


def register(name: str, description: str):
    """Decorator: register ``factory(d_model, **options) -> RecurrentLayer`` under ``name``.

    The factory must return a layer mapping (B, T, d_model) to (B, T, d_model).
    """

    def wrap(factory):
        if name in _REGISTRY and _REGISTRY[name].factory is not factory:
            raise ValueError(f"layer name {name!r} is registered twice")
        _REGISTRY[name] = LayerEntry(name, description, factory)
        return factory

    return wrap


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = importlib.import_module("recurra.layers")
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"recurra.layers.{info.name}")
        except Exception as e:  # one broken layer file must not take the others down
            _BROKEN[info.name] = f"{type(e).__name__}: {e}"
            warnings.warn(f"recurra.layers.{info.name} failed to import and registers no "
                          f"layer: {_BROKEN[info.name]}", RuntimeWarning, stacklevel=3)
    _discovered = True


def broken_modules() -> dict[str, str]:
    """Layer modules that failed to import (module name -> error); empty when all is well."""
    _discover()
    return dict(_BROKEN)


def available() -> list[str]:
    """Names of all registered layers, sorted."""
    _discover()
    return sorted(_REGISTRY)


def describe() -> dict[str, str]:
    """Name -> one-line description of every registered layer."""
    _discover()
    return {name: _REGISTRY[name].description for name in sorted(_REGISTRY)}


def build(name: str, d_model: int, **options) -> RecurrentLayer:
    """Build the layer registered as ``name`` for width ``d_model``."""
    _discover()
    if name not in _REGISTRY:
        broken = "".join(f"; module recurra.layers.{m} failed to import ({err})"
                         for m, err in _BROKEN.items())
        raise ValueError(
            f"unknown layer name {name!r}; available layers: {', '.join(available())}{broken}"
        )
    if not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    return _REGISTRY[name].factory(d_model, **options)
