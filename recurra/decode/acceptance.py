"""Calibrated acceptance probabilities for drafted tokens, learnt online from hindsight.

A drafter that builds its tree node by node needs, for every candidate child, the probability
that it is the model's next token given that its parent was (a node's probability of being
accepted is then the product along its path). :class:`AcceptanceCalibration` keeps that
probability per *bucket* of cheap features and learns it from the text actually emitted: every
candidate whose parent turned out right is one trial, a hit if it carries the next token.

Token Recycling's buckets (:func:`recycled_bucket`) are

- the **confidence** the model gave the successor when the row was recorded (its softmax
  probability, in :data:`CONFIDENCE_BINS`);
- how many of the **preceding tokens** match those the record was made after: none (the
  token's row, written in another context), the previous token, or the two previous tokens;
- whether the row was recorded **in this call** (this prompt and its output) or earlier;

and prompt lookup's copied tokens get their own buckets by the length of the n-gram that matched
(2, or 3 and more) and the depth along the copied chain (:func:`lookup_bucket`). The hit rate of a bucket is ``(hits + prior * w) / (trials + w)`` with a
prior weight ``w``; a bucket's counts are scaled down once its trials pass ``window``, so the
estimates keep following the text (an exponential forgetting of old trials).
"""

from __future__ import annotations

import numpy as np

#: lower edges of the confidence bins (a successor's recorded softmax probability)
CONFIDENCE_BINS = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9])
#: chain depths with their own lookup bucket (deeper copied tokens share the last)
LOOKUP_DEPTHS = 8

#: prior hit rates [context tokens matched: 0, 1 or 2][recorded in this call][confidence bin],
#: rounded from the hindsight log of ``recurra bench decode``'s ten SmolLM2 prompts (2026-11-27,
#: 2-core CPU) and made monotone in the confidence (two matched tokens: one matched token's
#: rates raised a little); the live counts replace them within a few hundred trials
RECYCLED_PRIOR = np.array([
    [[0.005, 0.01, 0.02, 0.05, 0.08, 0.10, 0.15, 0.20],    # other context, earlier call
     [0.03, 0.05, 0.10, 0.13, 0.20, 0.22, 0.26, 0.38]],    # other context, this call
    [[0.03, 0.04, 0.10, 0.14, 0.20, 0.30, 0.45, 0.50],     # same previous token, earlier call
     [0.03, 0.07, 0.10, 0.23, 0.39, 0.52, 0.65, 0.68]],    # same previous token, this call
    [[0.03, 0.05, 0.12, 0.17, 0.25, 0.35, 0.50, 0.55],     # same two previous tokens, earlier
     [0.03, 0.08, 0.12, 0.26, 0.42, 0.56, 0.70, 0.75]],    # same two previous tokens, this call
])
#: prior hit rate of a copied token at chain depth 1, 2, ... given the tokens before it were
#: right, after a matched 2-gram and after a 3-gram (or longer)
LOOKUP_PRIOR = np.array([[0.2, 0.4, 0.5, 0.6, 0.65, 0.65, 0.65, 0.65],
                         [0.4, 0.6, 0.7, 0.75, 0.8, 0.8, 0.8, 0.8]])

NUM_RECYCLED = RECYCLED_PRIOR.size
NUM_BUCKETS = NUM_RECYCLED + LOOKUP_PRIOR.size


def confidence_bins(confidence: np.ndarray) -> np.ndarray:
    """The :data:`CONFIDENCE_BINS` bin (int64) of each recorded probability."""
    bins = np.searchsorted(CONFIDENCE_BINS, confidence, side="right") - 1
    return np.clip(bins, 0, len(CONFIDENCE_BINS) - 1)


def recycled_bucket(context: int, this_call: bool, bins: np.ndarray) -> np.ndarray:
    """Bucket indices of recycled successors recorded after ``context`` (0, 1 or 2) of the
    same preceding tokens as now, whose probabilities fall in confidence ``bins``
    (:func:`confidence_bins`)."""
    return (int(context) * 2 + int(bool(this_call))) * len(CONFIDENCE_BINS) + bins


def lookup_bucket(depth: int, ngram: int) -> int:
    """Bucket index of a copied token at ``depth`` (>= 1) along a lookup chain that followed a
    matched ``ngram`` (>= 2 tokens)."""
    if depth < 1 or ngram < 2:
        raise ValueError(f"need depth >= 1 and ngram >= 2, got {depth}, {ngram}")
    return NUM_RECYCLED + (min(ngram, 3) - 2) * LOOKUP_DEPTHS + min(depth, LOOKUP_DEPTHS) - 1


class AcceptanceCalibration:
    """Per-bucket hit rates with a prior, learnt from observed trials (module docstring)."""

    def __init__(self, prior: np.ndarray | None = None, prior_weight: float = 8.0,
                 window: float = 400.0):
        if prior_weight <= 0 or window <= prior_weight:
            raise ValueError(f"need 0 < prior_weight < window, got {prior_weight}, {window}")
        if prior is None:
            prior = np.concatenate([RECYCLED_PRIOR.ravel(), LOOKUP_PRIOR.ravel()])
        prior = np.asarray(prior, dtype=np.float64)
        if prior.shape != (NUM_BUCKETS,) or not ((prior >= 0) & (prior <= 1)).all():
            raise ValueError(f"prior must hold {NUM_BUCKETS} rates in [0, 1] (one per bucket), "
                             f"got shape {prior.shape}")
        self.prior = prior
        self.prior_weight, self.window = float(prior_weight), float(window)
        self.reset()

    def reset(self) -> None:
        """Back to the prior."""
        self.hits = np.zeros(NUM_BUCKETS)
        self.trials = np.zeros(NUM_BUCKETS)
        self._rates = self.prior.copy()

    def rates(self) -> np.ndarray:
        """The current hit-rate estimate of every bucket (a view: do not modify)."""
        return self._rates

    def observe(self, buckets: np.ndarray, hits: np.ndarray) -> None:
        """Count one trial per entry of ``buckets``, a hit where ``hits`` is True."""
        buckets = np.asarray(buckets, dtype=np.int64)
        np.add.at(self.trials, buckets, 1.0)
        np.add.at(self.hits, buckets[np.asarray(hits, dtype=bool)], 1.0)
        full = self.trials > self.window
        if full.any():
            scale = np.where(full, self.window / np.maximum(self.trials, 1.0), 1.0)
            self.hits *= scale
            self.trials *= scale
        w = self.prior_weight
        self._rates = (self.hits + w * self.prior) / (self.trials + w)
