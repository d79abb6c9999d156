"""The configuration of a training run: the model's config dict plus the optimisation settings.

Saved as JSON next to every checkpoint; ``TrainConfig.from_dict(json.load(...))`` rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any


def default_model() -> dict[str, Any]:
    """A small byte-level LSTM language model (the ``recurra train`` default)."""
    return {"architecture": "recurrent", "vocab_size": 256, "d_model": 128, "n_layers": 2,
            "layer": "lstm", "layer_options": {}, "mlp_ratio": 2, "dropout": 0.0,
            "tie_weights": True}


@dataclass
class TrainConfig:
    #: model config dict for ``recurra.models.build_model``
    model: dict[str, Any] = field(default_factory=default_model)
    #: text file or folder; None = the embedded pydoc corpus
    data: str | None = None
    #: tokens per stream per step (the truncated back-propagation window)
    seq_len: int = 32
    #: parallel streams per process (with torchrun, each rank has its own)
    batch_size: int = 64
    steps: int = 600
    lr: float = 4e-3
    #: the cosine decays to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 0
    #: evaluate (and checkpoint) every this many steps, and at the end
    eval_every: int = 200
    #: parallel streams used to read the validation text
    eval_batch_size: int = 32
    out: str = "runs/default"
    #: "auto" (cuda when available), "cpu", "cuda", "cuda:1", ...
    device: str = "auto"
    #: JRT prefix training (0 = off): every window of seq_len bytes is a sequence whose first
    #: prefix_length bytes the model's prefix layers read non-causally; the loss is next-token
    #: cross-entropy on the rest plus mlm_weight x a masked-LM loss on the prefix
    #: (recurra.train.prefix_objective); no state is carried between windows
    prefix_length: int = 0
    mlm_weight: float = 0.25
    #: fraction of prefix bytes replaced by mask_token (a byte value; NUL by default)
    mask_prob: float = 0.15
    mask_token: int = 0

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        positive = ("seq_len", "batch_size", "steps", "eval_every", "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio!r}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")
        if not isinstance(self.prefix_length, int) or isinstance(self.prefix_length, bool) \
                or not 0 <= self.prefix_length < self.seq_len:
            raise ValueError(f"prefix_length must be an int in [0, seq_len - 1 = "
                             f"{self.seq_len - 1}] (0 = off), got {self.prefix_length!r}")
        if not self.mlm_weight >= 0:
            raise ValueError(f"mlm_weight must be >= 0, got {self.mlm_weight!r}")
        if not 0 < self.mask_prob <= 1:
            raise ValueError(f"mask_prob must lie in (0, 1], got {self.mask_prob!r}")
        if not isinstance(self.mask_token, int) or not 0 <= self.mask_token <= 255:
            raise ValueError(f"mask_token must be a byte value in [0, 255], got "
                             f"{self.mask_token!r}")
        if not isinstance(self.model, dict):
            raise ValueError(f"model must be a config dict, got {type(self.model).__name__}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**data)
