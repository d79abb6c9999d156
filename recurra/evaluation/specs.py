"""What one evaluation cell is, and the budgets cells are trained under.

A **cell** trains one small model on one task and tests it at several lengths. It is named by

- a task spec, e.g. ``parity`` or ``set_disjointness:order=long_first:jrt_prompt=true``
  (see ``recurra.tasks.registry``); options after ``@`` apply to the test sets only
  (``passkey@depth=1``: trained with random needle depths, tested with the needle at the end);
- a model spec: a registered layer name (``lstm``, ``mamba2``, ...) or ``transformer``, with
  options ``name:option=value:...``. ``d_model``, ``n_layers``, ``mlp_ratio``, ``tie_weights``
  (default: the task's ``tie_weights``) (and ``n_heads``,
  ``positions`` for the transformer) set the model; every other option goes to the layer.
  Options after ``@`` apply at *test time only*: the trained weights are loaded into a model built
  with them (``mamba2:d_state=16@some_mitigation=true``), for training-free fixes.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from ..tasks.registry import parse_spec

MODEL_KEYS = {"d_model", "n_layers", "mlp_ratio", "tie_weights"}
TRANSFORMER_KEYS = MODEL_KEYS | {"n_heads", "positions", "max_len", "rope_base"}


@dataclass(frozen=True)
class Budget:
    """Model size and training budget of every cell of a run."""

    name: str
    d_model: int
    n_layers: int
    steps: int
    batch_size: int
    lr: float
    n_test: int
    #: stop training after this many seconds (the cell is then marked ``time_capped``); 0 = never
    max_train_seconds: float = 0.0
    warmup: int = 20
    #: stop early once the mean training loss of the last ``patience`` steps is below this
    #: (deterministic: it depends on the losses only); 0 = never
    early_stop_loss: float = 0.005
    patience: int = 20
    #: continual training: the first ``warm_start_steps`` steps train at ``warm_start_length``
    #: (a shorter length the task is easy at), the rest at the cell's training length; 0 = off
    warm_start_steps: int = 0
    warm_start_length: int = 0


BUDGETS = {
    # CI: seconds per cell
    "smoke": Budget("smoke", d_model=32, n_layers=1, steps=80, batch_size=32, lr=1e-2,
                    n_test=128, max_train_seconds=60),
    # the measured run of EVALUATION.md (fits a shared 2-core machine)
    "small": Budget("small", d_model=64, n_layers=1, steps=300, batch_size=32, lr=5e-3,
                    n_test=256, max_train_seconds=90),
    # larger models and longer training, for an idle machine
    "full": Budget("full", d_model=64, n_layers=2, steps=600, batch_size=32, lr=3e-3,
                   n_test=256, max_train_seconds=240),
}


@dataclass(frozen=True)
class ModelSpec:
    spec: str
    architecture: str  # "transformer" or "recurrent"
    layer: str | None
    model_options: dict[str, Any] = field(default_factory=dict)
    layer_options: dict[str, Any] = field(default_factory=dict)
    test_layer_options: dict[str, Any] = field(default_factory=dict)


def split_test_options(spec: str) -> tuple[str, str]:
    """``"name:a=1@b=2"`` -> ``("name:a=1", "b=2")``: the training spec and the test-only options."""
    train, _, test = spec.partition("@")
    return train, test


def parse_model_spec(spec: str) -> ModelSpec:
    """Parse ``name[:opt=v...][@opt=v...]`` (see the module docstring)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a model spec must be a non-empty string, got {spec!r}")
    train_part, _, test_part = spec.strip().partition("@")
    name, options = parse_spec(train_part)
    test_options: dict[str, Any] = {}
    if test_part:
        _, test_options = parse_spec("x:" + test_part)
    if name == "transformer":
        unknown = set(options) - TRANSFORMER_KEYS
        if unknown or test_options:
            raise ValueError(f"model spec {spec!r}: the transformer takes only "
                             f"{sorted(TRANSFORMER_KEYS)}, got {sorted(unknown | set(test_options))}")
        return ModelSpec(spec, "transformer", None, dict(options), {}, {})
    model_options = {k: v for k, v in options.items() if k in MODEL_KEYS}
    layer_options = {k: v for k, v in options.items() if k not in MODEL_KEYS}
    bad = set(test_options) & MODEL_KEYS
    if bad:
        raise ValueError(f"model spec {spec!r}: test-time options cannot change {sorted(bad)}")
    return ModelSpec(spec, "recurrent", name, model_options, layer_options, test_options)


#: budget fields a cell may override (``CellSpec.overrides``)
OVERRIDABLE = ("steps", "lr", "batch_size", "max_train_seconds", "warmup", "n_test",
               "warm_start_steps", "warm_start_length")


@dataclass(frozen=True)
class CellSpec:
    task: str
    model: str
    train_length: int
    test_lengths: tuple[int, ...]
    seed: int = 0
    #: per-cell changes to the run's budget, as ``(("steps", 2000), ...)``: a suite sizes each
    #: task's training (S5 needs more steps than parity); part of the cell's configuration
    overrides: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self):
        for item in self.overrides:
            if not (isinstance(item, tuple) and len(item) == 2 and item[0] in OVERRIDABLE):
                raise ValueError(f"overrides must be (name, value) pairs with names in "
                                 f"{OVERRIDABLE}, got {item!r}")

    def budget(self, budget: Budget) -> Budget:
        """The run's budget with this cell's overrides applied."""
        return replace(budget, **dict(self.overrides)) if self.overrides else budget

    def cell_id(self) -> str:
        """A file-name-safe id, unique per (task, model, training length)."""
        text = f"{self.task}__{self.model}__train{self.train_length}"
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "-", text)
        return safe if len(safe) < 150 else safe[:120] + "-" + _digest(text)[:12]

    def config(self, budget: Budget) -> dict[str, Any]:
        """Everything that determines the cell's result (a resumed run compares it)."""
        cell = asdict(self) | {"test_lengths": list(self.test_lengths)}
        cell.pop("overrides")
        if self.overrides:
            cell["overrides"] = dict(self.overrides)
        return {"cell": cell, "budget": asdict(self.budget(budget))}


def config_hash(config: dict[str, Any]) -> str:
    return _digest(json.dumps(config, sort_keys=True, default=str))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
