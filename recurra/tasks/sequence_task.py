"""The common shape of recurra's synthetic tasks: token sequences with per-position targets.

Every synthetic task of the evaluation suite is a :class:`SequenceTask`. ``task.sample(n, length,
seed=..., split=...)`` returns a :class:`TaskBatch`:

- ``inputs`` (n, T) long: the token sequence a causal model reads;
- ``targets`` (n, T) long: at position t, the token the model must output after reading
  ``inputs[:, :t+1]``; only meaningful where ``mask`` is True (0 elsewhere);
- ``mask`` (n, T) bool: the answer positions (loss and accuracy are computed there only);
- ``vocab_size``: inputs and targets both lie in ``[0, vocab_size)``, so a language model with
  this vocabulary can be trained on the task directly (classification at the answer positions).

Determinism and splits: the random stream of a batch is a function of ``(task name and options,
seed, split, length)`` only. ``split="train"`` and ``split="test"`` use independent streams, so a
test batch never reuses the random draws of the training batches (for tiny instance spaces, e.g.
parity over 4 bits, identical sequences can still occur by chance).

``length`` is each task's size knob (documented per task: the number of symbols to copy, of bits,
of key-value pairs, of tokens in a passkey context, ...); ``task.sequence_length(length)`` says
how long the resulting token sequences are.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

SPLITS = ("train", "test", "valid")


@dataclass(frozen=True)
class TaskBatch:
    """A batch of a synthetic task (see the module docstring)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    vocab_size: int
    #: optional per-example information (e.g. the answer, a needle depth); numpy arrays
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.inputs.shape != self.targets.shape or self.inputs.shape != self.mask.shape:
            raise ValueError(
                f"inputs, targets and mask must share one shape (n, T), got "
                f"{tuple(self.inputs.shape)}, {tuple(self.targets.shape)}, {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return int(self.inputs.shape[0])


class SequenceTask:
    """Base class: subclasses set the class attributes and implement ``_generate``."""

    #: registry name of the task family
    name: ClassVar[str] = ""
    #: one-line description
    description: ClassVar[str] = ""
    #: what ``length`` means for this task
    length_meaning: ClassVar[str] = ""
    #: metric the evaluation reports first: "token" (fraction of answer positions right),
    #: "sequence" (all answer positions of an example right) or "last" (the last answer position)
    primary_metric: ClassVar[str] = "sequence"
    #: default length to train at and lengths to test at (test lengths beyond training included)
    default_train_length: ClassVar[int] = 16
    default_test_lengths: ClassVar[tuple[int, ...]] = (8, 16, 32, 64)
    #: smallest valid ``length``
    min_length: ClassVar[int] = 1
    #: size of the token vocabulary (inputs and targets); set by each task's constructor
    vocab_size: int = 0
    #: whether an input token and a target token with the same id mean the same thing, so a
    #: model may tie its output head to its embedding (False for e.g. S5: a move vs a state)
    tie_weights: ClassVar[bool] = True

    def options(self) -> dict[str, Any]:
        """The constructor options of this task (used for seeding and for reports)."""
        return {}

    def train_lengths(self, max_length: int) -> list[int]:
        """Lengths a training run at ``max_length`` draws its batches from (default: only it)."""
        return [max_length]

    def sequence_length(self, length: int) -> int:
        """Number of tokens of a sequence generated at ``length``."""
        raise NotImplementedError

    def _generate(self, n: int, length: int, rng: np.random.Generator) -> TaskBatch:
        raise NotImplementedError

    # ----------------------------------------------------------------- public API
    def sample(self, n: int, length: int, *, seed: int = 0, split: str = "train") -> TaskBatch:
        """``n`` examples at size ``length``, deterministic in ``(seed, split, length)``."""
        if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
            raise ValueError(f"n must be a positive int (number of examples), got {n!r}")
        self.check_length(length)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        rng = task_rng(self.key(), seed, split, int(length))
        batch = self._generate(int(n), int(length), rng)
        expected = (int(n), self.sequence_length(int(length)))
        if tuple(batch.inputs.shape) != expected:  # a generator bug, not a user error
            raise AssertionError(f"{self.name}: generated {tuple(batch.inputs.shape)}, "
                                 f"expected {expected}")
        return batch

    def check_length(self, length: int) -> None:
        if not isinstance(length, (int, np.integer)) or isinstance(length, bool):
            raise ValueError(f"length must be an int ({self.length_meaning}), got {length!r}")
        if length < self.min_length:
            raise ValueError(
                f"length must be >= {self.min_length} for task {self.name!r} "
                f"({self.length_meaning}), got {length}"
            )

    def key(self) -> str:
        """Stable identity of the task and its options (names the random stream)."""
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options().items()))
        return f"{self.name}({opts})"

    def __repr__(self) -> str:
        return self.key()


def task_rng(key: str, seed: int, split: str, length: int) -> np.random.Generator:
    """The random generator of one batch: a function of its identity only."""
    entropy = [zlib.crc32(key.encode()), int(seed), SPLITS.index(split), int(length)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def make_batch(inputs: np.ndarray, targets: np.ndarray, mask: np.ndarray, vocab_size: int,
               **info: Any) -> TaskBatch:
    """Build a :class:`TaskBatch` from numpy arrays (targets are zeroed outside the mask)."""
    mask = np.asarray(mask, dtype=bool)
    targets = np.where(mask, targets, 0)
    return TaskBatch(
        inputs=torch.as_tensor(np.ascontiguousarray(inputs), dtype=torch.long),
        targets=torch.as_tensor(np.ascontiguousarray(targets), dtype=torch.long),
        mask=torch.as_tensor(np.ascontiguousarray(mask), dtype=torch.bool),
        vocab_size=int(vocab_size),
        info=info,
    )


def check_int_option(name: str, value: Any, low: int, high: int | None = None) -> int:
    """Validate an integer task option: ValueError naming it and its range."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def check_float_option(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float, np.floating)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def check_bool_option(name: str, value: Any) -> bool:
    if isinstance(value, str):
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be a boolean (true/false/1/0), got {value!r}")


def check_choice_option(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value
