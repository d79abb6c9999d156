"""``recurra.decode.generate``: one entry point for every strategy and speculative method.

    out = generate(model, input_ids, max_new_tokens=64)                       # greedy
    out = generate(model, ids, 64, strategy="sample", temperature=0.8, top_p=0.9, seed=0)
    out = generate(model, ids, 64, speculative="token_recycling")             # lossless, faster
    out = generate(model, ids, 64, strategy="beam", num_beams=4)
    out.tokens, out.stats.mean_accepted, out.stats.tokens_per_s
    for chunk in stream(model, ids, 64, speculative="prompt_lookup"): print(chunk)

``model`` is a recurrent model, a :class:`~recurra.models.transformer_lm.TransformerLM`, a
transformers causal LM or a :class:`~recurra.decode.protocol.DecodeAdapter`. Every other keyword
is a field of :class:`DecodeOptions` (one definition serves both entry points).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .processors import ProcessorList, build_processors, build_warpers
from .protocol import as_adapter
from .sampling import make_generator
from .speculative import Drafter
from .stats import DecodeStats

STRATEGIES = ("greedy", "sample", "beam", "diverse_beam", "conditional_beam")
BEAM_STRATEGIES = ("beam", "diverse_beam", "conditional_beam")
SPECULATIVE = ("prompt_lookup", "token_recycling", "aded", "draft", "rsd")

# drafters that learn across calls (Token Recycling's matrix, ADED's table) live per model
_DRAFTERS: weakref.WeakKeyDictionary[Any, dict] = weakref.WeakKeyDictionary()


@dataclass
class DecodeOptions:
    """The keywords of :func:`generate` and :func:`stream` besides model, ids, length, strategy
    and speculative method."""

    #: stops a row (the EOS token is emitted); finished rows are padded with ``pad_token_id``
    #: (default: the first EOS, else 0)
    eos_token_id: int | Sequence[int] | None = None
    pad_token_id: int | None = None
    #: processors (see :mod:`recurra.decode.processors`)
    processors: Sequence | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    no_repeat_ngram_size: int | None = None
    #: sampling ("sample"): warpers and the seeded generator
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    generator: torch.Generator | None = None
    #: speculative decoding: the drafter's constructor options, the draft model ("draft", "rsd")
    speculative_options: dict | None = None
    draft_model: Any = None
    #: beam strategies
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    num_return_sequences: int = 1
    num_beam_groups: int = 1
    diversity_penalty: float = 0.0
    attribute_classifier: Any = None
    attribute_weight: float = 1.0

    @property
    def eos(self) -> list[int]:
        e = self.eos_token_id
        if e is None:
            return []
        return [e] if isinstance(e, int) else [int(x) for x in e]

    @property
    def pad(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos[0] if self.eos else 0

    def build_processors(self) -> ProcessorList:
        return build_processors(self.repetition_penalty, self.presence_penalty,
                                self.frequency_penalty, self.no_repeat_ngram_size, self.processors)


@dataclass
class GenerateOutput:
    #: new tokens (B * num_return_sequences, n); rows that stopped early are padded
    tokens: torch.Tensor
    stats: DecodeStats = field(default_factory=DecodeStats)
    #: beam strategies: the final score of every returned sequence
    sequences_scores: torch.Tensor | None = None

    def tolist(self) -> list[list[int]]:
        return self.tokens.tolist()


def drafter_for(model, speculative, options: dict | None = None) -> Drafter:
    """The drafter for a ``speculative`` name (kept per model, so learnt tables persist) or the
    :class:`Drafter` instance itself."""
    if isinstance(speculative, Drafter):
        return speculative
    options = dict(options or {})
    key = (speculative, tuple(sorted((k, repr(v)) for k, v in options.items())))
    try:
        per_model = _DRAFTERS.setdefault(model, {})
    except TypeError:  # not weak-referenceable
        per_model = {}
    if key not in per_model:
        if speculative == "prompt_lookup":
            from .prompt_lookup import PromptLookup
            per_model[key] = PromptLookup(**options)
        elif speculative == "token_recycling":
            from .token_recycling import TokenRecycling
            per_model[key] = TokenRecycling(**options)
        elif speculative == "aded":
            from .aded import ADED
            per_model[key] = ADED(**options)
        else:
            raise ValueError(f"speculative must be one of None, {', '.join(SPECULATIVE)} or a "
                             f"Drafter, got {speculative!r}")
    return per_model[key]


def _check_input_ids(input_ids) -> torch.Tensor:
    if isinstance(input_ids, (list, tuple)):
        input_ids = torch.tensor([list(input_ids)] if input_ids and isinstance(
            input_ids[0], int) else [list(r) for r in input_ids], dtype=torch.long)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2):
        raise ValueError("input_ids must be a LongTensor of shape (batch, prompt_length) or "
                         "(prompt_length,)")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.shape[1] < 1 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids must hold at least one token per row, got shape "
                         f"{tuple(input_ids.shape)}")
    if input_ids.is_floating_point():
        raise ValueError(f"input_ids must hold integers, got {input_ids.dtype}")
    return input_ids.long()


def _check_call(input_ids, max_new_tokens, strategy) -> torch.Tensor:
    input_ids = _check_input_ids(input_ids)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    return input_ids


def stream(model, input_ids, max_new_tokens: int = 32, strategy: str = "greedy",
           speculative=None, stats: DecodeStats | None = None,
           **options) -> Iterator[list[int]]:
    """Yields lists of new tokens as they are decided (greedy / sample only).

    Keywords are the fields of :class:`DecodeOptions` (as for :func:`generate`); ``stats`` (a
    :class:`DecodeStats`) is filled in.
    """
    input_ids = _check_call(input_ids, max_new_tokens, strategy)
    if strategy not in ("greedy", "sample"):
        raise ValueError(f"stream() serves strategy 'greedy' or 'sample'; use generate() for "
                         f"{strategy!r}")
    return _stream(model, input_ids, max_new_tokens, strategy, speculative,
                   stats if stats is not None else DecodeStats(), DecodeOptions(**options))


def _stream(model, input_ids, max_new_tokens, strategy, speculative, stats: DecodeStats,
            opts: DecodeOptions) -> Iterator[list[int]]:
    if max_new_tokens == 0:
        return
    adapter = as_adapter(model)
    procs = opts.build_processors()
    sample = strategy == "sample"
    generator = None
    if sample:
        procs = ProcessorList(procs + build_warpers(opts.temperature, opts.top_k, opts.top_p))
        generator = opts.generator if opts.generator is not None else make_generator(opts.seed)
    procs.start(input_ids.shape[1])
    procs = procs if len(procs) else None
    start = time.perf_counter()
    if speculative is None or speculative == "none":
        from .autoregressive import autoregressive_decode

        chunks = (token.tolist() for token in autoregressive_decode(
            adapter.new_session(), input_ids, max_new_tokens, opts.eos, opts.pad, procs, sample,
            generator, stats))
    else:
        if input_ids.shape[0] != 1:
            raise ValueError(f"speculative decoding serves a batch of 1, got "
                             f"{input_ids.shape[0]} rows")
        prompt = input_ids[0].tolist()
        if speculative in ("draft", "rsd"):
            from .draft_model import draft_model_decode

            if opts.draft_model is None:
                raise ValueError(f"speculative={speculative!r} needs draft_model=")
            chunks = draft_model_decode(
                adapter, as_adapter(opts.draft_model), prompt, max_new_tokens, opts.eos, procs,
                sample, generator, stats, method=speculative, **(opts.speculative_options or {}))
        else:
            from .speculative import speculative_decode

            drafter = drafter_for(getattr(adapter, "model", adapter), speculative,
                                  opts.speculative_options)
            chunks = speculative_decode(adapter.new_session(), prompt, drafter, max_new_tokens,
                                        opts.eos, procs, sample, generator, stats,
                                        adapter.vocab_size)
    for chunk in chunks:
        stats.seconds = time.perf_counter() - start
        yield chunk
    stats.seconds = time.perf_counter() - start


def generate(model, input_ids, max_new_tokens: int = 32, strategy: str = "greedy",
             speculative=None, **options) -> GenerateOutput:
    """Decode ``max_new_tokens`` tokens after ``input_ids`` (B, T).

    - ``strategy``: "greedy", "sample" (``temperature``, ``top_k``, ``top_p``, ``seed`` or
      ``generator``), "beam" (``num_beams``, ``length_penalty``, ``early_stopping``,
      ``num_return_sequences``), "diverse_beam" (``num_beam_groups``, ``diversity_penalty``),
      "conditional_beam" (``attribute_classifier``, ``attribute_weight``).
    - ``speculative`` (greedy / sample, batch 1, lossless): None, "prompt_lookup",
      "token_recycling", "aded", "draft" / "rsd" (with ``draft_model``), or a
      :class:`~recurra.decode.speculative.Drafter`; ``speculative_options`` go to its constructor.
    - processors: ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``,
      ``no_repeat_ngram_size`` and any ``processors`` (see :mod:`recurra.decode.processors`).
    - ``eos_token_id`` stops a row (the EOS token is emitted); finished rows are padded with
      ``pad_token_id`` (default: the first EOS, else 0).

    Every keyword is a field of :class:`DecodeOptions`.
    """
    opts = DecodeOptions(**options)
    stats = DecodeStats()
    input_ids = _check_call(input_ids, max_new_tokens, strategy)
    if strategy in BEAM_STRATEGIES:
        if speculative not in (None, "none"):
            raise ValueError(f"speculative decoding serves 'greedy' and 'sample', not {strategy!r}")
        from .beam import beam_generate

        procs = opts.build_processors()
        procs.start(input_ids.shape[1])
        start = time.perf_counter()
        tokens, scores = beam_generate(
            as_adapter(model), input_ids, max_new_tokens, strategy=strategy,
            eos_token_ids=opts.eos, pad_token_id=opts.pad_token_id,
            processors=procs if len(procs) else None, num_beams=opts.num_beams,
            length_penalty=opts.length_penalty, early_stopping=opts.early_stopping,
            num_return_sequences=opts.num_return_sequences,
            num_beam_groups=opts.num_beam_groups, diversity_penalty=opts.diversity_penalty,
            attribute_classifier=opts.attribute_classifier,
            attribute_weight=opts.attribute_weight, stats=stats)
        stats.seconds = time.perf_counter() - start
        stats.new_tokens = tokens.shape[1]
        return GenerateOutput(tokens, stats, scores)
    chunks = list(_stream(model, input_ids, max_new_tokens, strategy, speculative, stats, opts))
    if speculative is None or speculative == "none":
        tokens = (torch.tensor(chunks, dtype=torch.long).T if chunks
                  else torch.zeros(input_ids.shape[0], 0, dtype=torch.long))
    else:
        tokens = torch.tensor([[t for c in chunks for t in c]], dtype=torch.long)
    return GenerateOutput(tokens, stats)
