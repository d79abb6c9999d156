"""Synthetic tasks by name: ``build_task("set_disjointness:order=long_first")``.

A task spec is ``name`` or ``name:option=value:option=value`` (options are the task
constructor's keyword arguments; values are parsed as int, float or bool when they look like
one). ``available()`` lists the names, ``describe()`` their one-line descriptions.
Tasks load lazily: listing them imports nothing heavy.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, class, fixed options)
_TASKS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "copy": ("recurra.tasks.copying", "CopyTask", {}),
    "reverse": ("recurra.tasks.copying", "CopyTask", {"reverse": True}),
    "parity": ("recurra.tasks.state_tracking", "ParityTask", {}),
    "s5": ("recurra.tasks.state_tracking", "PermutationTask", {}),
    "s3": ("recurra.tasks.state_tracking", "PermutationTask", {"n_items": 3}),
    "mqar": ("recurra.tasks.associative_recall", "AssociativeRecallTask", {}),
    "set_disjointness": ("recurra.tasks.set_disjointness", "SetDisjointnessTask", {}),
    "passkey": ("recurra.tasks.passkey", "PasskeyTask", {}),
    "hmm": ("recurra.tasks.hidden_markov", "HiddenMarkovTask", {}),
    "reber": ("recurra.tasks.reber", "ReberTask", {}),
    "arrows": ("recurra.tasks.arrow_pointing", "ArrowPointingTask", {}),
    "typos": ("recurra.tasks.typos", "TypoCorrectionTask", {}),
}


def available() -> list[str]:
    """Names of all registered synthetic tasks, sorted."""
    return sorted(_TASKS)


def _task_class(name: str):
    module, cls, fixed = _TASKS[name]
    return getattr(importlib.import_module(module), cls), fixed


def describe() -> dict[str, str]:
    """Name -> one-line description."""
    out = {}
    for name in available():
        cls, fixed = _task_class(name)
        out[name] = cls(**fixed).description
    return out


def parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:a=1:b=x"`` -> ``("name", {"a": 1, "b": "x"})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a spec must be a non-empty string 'name[:option=value...]', "
                         f"got {spec!r}")
    name, *parts = spec.strip().split(":")
    options: dict[str, Any] = {}
    for part in parts:
        if "=" not in part or not part.split("=", 1)[0]:
            raise ValueError(f"spec {spec!r}: option {part!r} must look like option=value")
        key, value = part.split("=", 1)
        options[key] = parse_value(value)
    return name, options


def build_task(spec: str, **options: Any):
    """Build a task from a spec string (plus keyword options, which win)."""
    name, parsed = parse_spec(spec)
    if name not in _TASKS:
        raise ValueError(f"unknown task {name!r}; available tasks: {', '.join(available())}")
    cls, fixed = _task_class(name)
    merged = {**parsed, **options}
    for key in fixed:
        if key in merged:
            raise ValueError(f"task {name!r} fixes option {key!r}; do not pass it")
    try:
        return cls(**fixed, **merged)
    except TypeError as e:  # an unknown option name
        raise ValueError(f"task {name!r}: {e}") from None
