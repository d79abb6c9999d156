"""Per-call decoding statistics (Spec-Bench conventions)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class DecodeStats:
    #: model passes after the prefill (one per verified draft or plain step)
    steps: int = 0
    #: tokens emitted (per row for batch > 1: the longest row)
    new_tokens: int = 0
    #: tokens run through the model after the prefill (tree nodes, padding excluded)
    verified_tokens: int = 0
    #: steps that carried at least one draft token
    draft_steps: int = 0
    prefill_seconds: float = 0.0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per model pass, bonus token included (1.0 = autoregressive)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_accepted=self.mean_accepted, tokens_per_s=self.tokens_per_s)
        return d
