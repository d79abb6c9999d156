"""Drawing tokens from scores with a seeded generator.

:func:`sample_token` draws by inverting the CDF with one uniform per row, so a method that draws
one token per *emitted* token, in order, from the same distributions consumes the generator
exactly like plain sampling: speculative sampling with sample-and-match then reproduces plain
sampling token for token under the same seed (and is distributed like it in any case).
"""

from __future__ import annotations

import torch


def sample_token(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``scores`` (N, V) (logits, -inf allowed) ~ softmax(scores)."""
    probs = torch.softmax(scores.double(), dim=-1)
    return sample_from_probs(probs, generator)


def sample_from_probs(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of ``probs`` (N, V) (non-negative, any positive total)."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, dtype=torch.float64,
                   device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_max(probs.shape[-1] - 1).squeeze(1)


def make_generator(seed: int | None, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g
