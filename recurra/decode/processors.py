"""Logits processors: ``scores = processor(input_ids, scores)``.

``input_ids`` (N, L) is each row's history (prompt + generated, including the token whose
successor is being scored) and ``scores`` (N, V) the scores of the next token; a processor returns
new scores (it may modify them in place). The conventions follow transformers' processors of the
same names, so users can move between the two. In speculative decoding each draft-tree node is a
row whose history is the committed sequence followed by the node's own ancestor path
(:func:`process_tree`).

Warpers for sampling (:class:`Temperature`, :class:`TopK`, :class:`TopP`) are processors too.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


class LogitsProcessor:
    """Base class; ``start(prompt_length)`` is called once per generate call."""

    def start(self, prompt_length: int) -> None:
        pass

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ProcessorList(list):
    """Applies its processors in order."""

    def start(self, prompt_length: int) -> None:
        for p in self:
            if hasattr(p, "start"):
                p.start(prompt_length)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for p in self:
            scores = p(input_ids, scores)
        return scores


class RepetitionPenalty(LogitsProcessor):
    """CTRL's penalty: every token present in the history (prompt included) gets
    ``s / penalty`` when ``s > 0`` and ``s * penalty`` otherwise, once per token."""

    def __init__(self, penalty: float):
        if not isinstance(penalty, (int, float)) or penalty <= 0:
            raise ValueError(f"repetition penalty must be a number > 0, got {penalty!r}")
        self.penalty = float(penalty)

    def __call__(self, input_ids, scores):
        seen = scores.gather(1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class PresenceFrequencyPenalty(LogitsProcessor):
    """OpenAI-style penalties over the *generated* tokens (the prompt is excluded unless
    ``include_prompt``): ``s -= presence * [count > 0] + frequency * count``."""

    def __init__(self, presence: float = 0.0, frequency: float = 0.0,
                 include_prompt: bool = False):
        self.presence, self.frequency = float(presence), float(frequency)
        self.include_prompt = include_prompt
        self.prompt_length = 0

    def start(self, prompt_length: int) -> None:
        self.prompt_length = 0 if self.include_prompt else prompt_length

    def __call__(self, input_ids, scores):
        generated = input_ids[:, self.prompt_length:]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.presence * (counts > 0).to(scores.dtype) - self.frequency * counts


class NoRepeatNGram(LogitsProcessor):
    """Bans every token that would complete an n-gram already present in the history."""

    def __init__(self, n: int):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"no_repeat_ngram_size must be a positive int, got {n!r}")
        self.n = n

    def __call__(self, input_ids, scores):
        n, length = self.n, input_ids.shape[1]
        if length + 1 < n:
            return scores
        scores = scores.clone()
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            tail = tuple(ids[length - n + 1:]) if n > 1 else ()
            banned = {ids[i + n - 1] for i in range(length - n + 1)
                      if tuple(ids[i:i + n - 1]) == tail}
            if banned:
                scores[row, list(banned)] = -float("inf")
        return scores


class Temperature(LogitsProcessor):
    def __init__(self, temperature: float):
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def __call__(self, input_ids, scores):
        return scores / self.temperature


class TopK(LogitsProcessor):
    """Keeps the k highest scores (ties at the k-th value are kept, like transformers)."""

    def __init__(self, k: int):
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"top_k must be a positive int, got {k!r}")
        self.k = k

    def __call__(self, input_ids, scores):
        k = min(self.k, scores.shape[-1])
        kth = scores.topk(k, dim=-1).values[..., -1:]
        return scores.masked_fill(scores < kth, -float("inf"))


class TopP(LogitsProcessor):
    """Nucleus: keeps the smallest set of top tokens whose probability reaches ``p``."""

    def __init__(self, p: float, min_tokens_to_keep: int = 1):
        if not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {p!r}")
        self.p, self.min_keep = float(p), min_tokens_to_keep

    def __call__(self, input_ids, scores):
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        remove = cum <= (1 - self.p)
        remove[..., -self.min_keep:] = False
        return scores.masked_fill(remove.scatter(-1, order, remove), -float("inf"))


def build_processors(repetition_penalty: float | None = None,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
                     no_repeat_ngram_size: int | None = None,
                     extra: Iterable[LogitsProcessor] | None = None) -> ProcessorList:
    out = ProcessorList(extra or [])
    if repetition_penalty is not None and repetition_penalty != 1.0:
        out.append(RepetitionPenalty(repetition_penalty))
    if presence_penalty or frequency_penalty:
        out.append(PresenceFrequencyPenalty(presence_penalty, frequency_penalty))
    if no_repeat_ngram_size:
        out.append(NoRepeatNGram(no_repeat_ngram_size))
    return out


def build_warpers(temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> ProcessorList:
    out = ProcessorList()
    if temperature != 1.0:
        out.append(Temperature(temperature))
    if top_k:
        out.append(TopK(top_k))
    if top_p is not None and top_p < 1.0:
        out.append(TopP(top_p))
    return out


def process_tree(processors, history: Sequence[int], tree, logits: torch.Tensor) -> torch.Tensor:
    """Scores of every node of ``tree``: row i is processed with the history ``history`` (which
    ends with the root token) followed by node i's ancestor path below the root, node i included.
    Nodes of one depth are processed as one batch."""
    if not processors:
        return logits
    out = torch.empty_like(logits)
    by_depth: dict[int, list[int]] = {}
    for i, d in enumerate(tree.depth):
        by_depth.setdefault(d, []).append(i)
    base = torch.tensor(list(history), dtype=torch.long, device=logits.device)
    for d, nodes in by_depth.items():
        rows = []
        for i in nodes:
            path = [tree.tokens[j] for j in tree.path_to(i)[1:]]
            rows.append(torch.cat((base, torch.tensor(path, dtype=torch.long,
                                                      device=logits.device))))
        ids = torch.stack(rows)
        out[nodes] = processors(ids, logits[nodes].clone())
    return out
