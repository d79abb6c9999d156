"""Accuracy at the answer positions of a task batch (see ``recurra.tasks.sequence_task``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Counts:
    """Running sums from which the three accuracies are computed."""

    tokens_right: int = 0
    tokens: int = 0
    sequences_right: int = 0
    lasts_right: int = 0
    sequences: int = 0

    def add(self, predictions: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> None:
        """Add a batch: ``predictions``, ``targets`` (n, T) long, ``mask`` (n, T) bool."""
        if predictions.shape != targets.shape or mask.shape != targets.shape:
            raise ValueError(
                f"predictions, targets and mask must share one shape, got "
                f"{tuple(predictions.shape)}, {tuple(targets.shape)}, {tuple(mask.shape)}")
        if not bool(mask.any(dim=1).all()):
            raise ValueError("every example must have at least one answer position in mask")
        right = (predictions == targets) & mask
        self.tokens_right += int(right.sum())
        self.tokens += int(mask.sum())
        self.sequences_right += int((right | ~mask).all(dim=1).sum())
        steps = mask.shape[1]
        last = steps - 1 - torch.flip(mask, dims=[1]).int().argmax(dim=1)  # last answer position
        self.lasts_right += int(right.gather(1, last.unsqueeze(1)).sum())
        self.sequences += int(mask.shape[0])

    def accuracies(self) -> dict[str, float]:
        return {
            "token": self.tokens_right / max(self.tokens, 1),
            "sequence": self.sequences_right / max(self.sequences, 1),
            "last": self.lasts_right / max(self.sequences, 1),
        }


def masked_accuracies(predictions: torch.Tensor, targets: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, float]:
    """Token, sequence and last-answer-position accuracy of one batch."""
    counts = Counts()
    counts.add(predictions, targets, mask)
    return counts.accuracies()
