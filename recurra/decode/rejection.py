"""Recursive rejection sampling (RRS): accept stochastic drafts so the output follows p exactly.

At a tree node with target distribution ``p`` and proposal ``q``, the children ``x_1..x_m`` were
drawn from ``q`` without replacement (Gumbel-top-k order). For j = 1..m, with ``Q_j`` = q
restricted to the tokens not drawn before x_j and renormalised (x_j's actual law given the
earlier draws):

    accept x_j with probability min(1, r(x_j) / Q_j(x_j))        (r starts as p)
    else r <- normalise(max(r - Q_j, 0))

and if every child is rejected, the token is drawn from the final r. Each step is an ordinary
rejection step of r against Q_j, so the emitted token is distributed exactly as p. With one
child this is Leviathan et al.'s speculative sampling (residual ``max(p - q, 0)``).

:func:`rrs_plan` computes the acceptance probabilities and the final residual; the sampler
(:func:`rrs_sample`) and the exact output law (:func:`rrs_distribution`, used by the
enumeration test) both read the same plan.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def rrs_plan(p: torch.Tensor, q: torch.Tensor, drafts: Sequence[int]
             ) -> tuple[list[float], torch.Tensor]:
    """Acceptance probability of each draft in order, and the residual after all rejections."""
    r = p.double().clone()
    remaining = q.double().clone()
    accept = []
    for x in drafts:
        total = remaining.sum()
        if total <= 0:
            raise ValueError("drafts must be distinct tokens with positive proposal probability")
        q_j = remaining / total
        if q_j[x] <= 0:
            raise ValueError(f"draft token {x} has zero proposal probability")
        accept.append(min(1.0, float(r[x] / q_j[x])))
        nxt = torch.clamp(r - q_j, min=0.0)
        s = nxt.sum()
        if s > 0:  # s == 0 means r == q_j: x_j was accepted surely, r is never used
            r = nxt / s
        remaining[x] = 0.0
    return accept, r


def rrs_distribution(p, q, drafts) -> torch.Tensor:
    """The exact law of the token RRS emits for these drafts."""
    accept, r = rrs_plan(p, q, drafts)
    out = torch.zeros_like(r)
    alive = 1.0
    for x, a in zip(drafts, accept):
        out[x] += alive * a
        alive *= 1.0 - a
    return out + alive * r


def rrs_sample(p, q, drafts, generator) -> tuple[int, int | None]:
    """(token, index of the accepted draft or None): one RRS decision."""
    from .sampling import sample_from_probs

    accept, r = rrs_plan(p, q, drafts)
    for j, (x, a) in enumerate(zip(drafts, accept)):
        u = float(torch.rand(1, generator=generator, dtype=torch.float64))
        if u < a:
            return int(x), j
    return int(sample_from_probs(r[None], generator)[0]), None


def always_accept(p, q, drafts, generator) -> tuple[int, int | None]:
    """A deliberately biased rule (accepts the first draft whenever there is one): a negative
    control for the distribution tests, never used by the engine."""
    from .sampling import sample_from_probs

    if drafts:
        return int(drafts[0]), 0
    return int(sample_from_probs(p[None], generator)[0]), None
