"""Attribute classifiers for conditional beam search, and a "non-degenerate output" trainer.

``generate(model, ids, n, strategy="conditional_beam", attribute_classifier=clf,
attribute_weight=w)`` ranks beams by ``log p(y) + w * log P(attribute | prefix)``, where ``clf``
maps the model's final hidden state of a prefix (..., D) to the attribute's logit (...,)
(see :mod:`recurra.decode.beam`).

:func:`train_nondegenerate_classifier` builds such a classifier for the attribute "this output
will not degenerate into repetition": it decodes continuations of the given prompts (greedy and
sampled), labels each by its repeated n-gram fraction (:func:`is_degenerate`), and fits a logistic
probe on the hidden state of every prefix of every continuation, labelled with its sequence's
outcome.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .protocol import as_adapter


class AttributeClassifier(nn.Module):
    """A logistic probe: ``logit = w . hidden + b``."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


def repeated_ngram_fraction(tokens: Sequence[int], n: int = 4) -> float:
    """Fraction of the n-grams of ``tokens`` that occurred earlier in it (0 = no repetition)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen, repeats = set(), 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def is_degenerate(tokens: Sequence[int], n: int = 4, threshold: float = 0.3) -> bool:
    return repeated_ngram_fraction(tokens, n) > threshold


@torch.no_grad()
def _hidden_states(adapter, ids: list[int]) -> torch.Tensor:
    session = adapter.new_session()
    _, hidden = session.append(torch.tensor([ids], device=adapter.device), return_hidden=True)
    return hidden[0].float()


def train_nondegenerate_classifier(model, prompts: Sequence[Sequence[int]],
                                   max_new_tokens: int = 48, samples_per_prompt: int = 4,
                                   temperature: float = 1.0, n: int = 4,
                                   threshold: float = 0.3, steps: int = 300, lr: float = 0.05,
                                   seed: int = 0):
    """(classifier, info): a probe for P(non-degenerate | prefix) on ``model``'s hidden states.

    ``info`` has the number of continuations, the fraction labelled degenerate and the probe's
    training accuracy over prefixes."""
    from .generate import generate

    adapter = as_adapter(model)
    features, labels = [], []
    n_seqs, n_bad = 0, 0
    for i, prompt in enumerate(prompts):
        prompt = [int(t) for t in prompt]
        conts = [generate(adapter, [prompt], max_new_tokens).tokens[0].tolist()]
        for s in range(samples_per_prompt):
            conts.append(generate(adapter, [prompt], max_new_tokens, strategy="sample",
                                  temperature=temperature, seed=seed * 1000 + i * 97 + s
                                  ).tokens[0].tolist())
        for cont in conts:
            good = not is_degenerate(cont, n, threshold)
            n_seqs += 1
            n_bad += not good
            hidden = _hidden_states(adapter, prompt + cont)[len(prompt) - 1:]
            features.append(hidden)
            labels.append(torch.full((hidden.shape[0],), float(good)))
    x, y = torch.cat(features), torch.cat(labels)
    clf = AttributeClassifier(x.shape[1])
    if 0 < float(y.mean()) < 1:
        pos = float(y.mean())
        weights = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))  # class-balanced
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        xs = (x - mean) / std
        probe = nn.Linear(x.shape[1], 1)
        opt = torch.optim.Adam(probe.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                loss = (nn.functional.binary_cross_entropy_with_logits(
                    probe(xs).squeeze(-1), y, reduction="none") * weights).mean()
                loss.backward()
                opt.step()
        with torch.no_grad():  # fold the standardisation into the probe
            clf.linear.weight.copy_(probe.weight / std)
            clf.linear.bias.copy_(probe.bias - (probe.weight / std) @ mean)
    else:  # one class only: a constant probe
        with torch.no_grad():
            clf.linear.weight.zero_()
            clf.linear.bias.fill_(6.0 if float(y.mean()) == 1 else -6.0)
    with torch.no_grad():
        accuracy = float(((clf(x) > 0).float() == y).float().mean())
    return clf, {"sequences": n_seqs, "degenerate_fraction": n_bad / max(1, n_seqs),
                 "prefix_accuracy": accuracy}
