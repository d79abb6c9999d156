"""Processors and beam strategies against transformers (the reference implementation)."""

from __future__ import annotations

import pytest
import torch
from decode_models import single_thread, tiny_llama  # noqa: F401

from recurra.decode import generate
from recurra.decode.processors import (
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
)

transformers = pytest.importorskip("transformers")
from transformers.generation import logits_process as hf


def test_no_repeat_ngram_known_cases():
    ids = torch.tensor([[1, 1, 2, 1], [0, 1, 0, 1]])
    scores = torch.zeros(2, 3)
    assert torch.isinf(NoRepeatNGram(2)(ids, scores)).tolist() == [[False, True, True],
                                                                   [True, False, False]]
    assert torch.isinf(NoRepeatNGram(3)(ids, scores)).tolist() == [[False, False, False],
                                                                   [True, False, False]]


def test_repetition_penalty_known_case():
    ids = torch.tensor([[0, 1], [5, 0]])
    scores = torch.tensor([[-1.0, 2.0, 3.0, 0.5, 0.0, 4.0], [3.0, -2.0, 1.0, 0.0, 0.0, -4.0]])
    out = RepetitionPenalty(2.0)(ids, scores.clone())
    assert out[0].tolist() == [-2.0, 1.0, 3.0, 0.5, 0.0, 4.0]
    assert out[1].tolist() == [1.5, -2.0, 1.0, 0.0, 0.0, -8.0]


@pytest.mark.parametrize("seed", range(5))
def test_processors_match_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 9, (4, 12), generator=g)
    scores = torch.randn(4, 9, generator=g) * 3
    pairs = [(RepetitionPenalty(1.7), hf.RepetitionPenaltyLogitsProcessor(1.7)),
             (RepetitionPenalty(0.6), hf.RepetitionPenaltyLogitsProcessor(0.6)),
             (NoRepeatNGram(2), hf.NoRepeatNGramLogitsProcessor(2)),
             (NoRepeatNGram(3), hf.NoRepeatNGramLogitsProcessor(3)),
             (NoRepeatNGram(1), hf.NoRepeatNGramLogitsProcessor(1)),
             (Temperature(0.7), hf.TemperatureLogitsWarper(0.7)),
             (TopK(3), hf.TopKLogitsWarper(3)),
             (TopP(0.8), hf.TopPLogitsWarper(0.8)),
             (TopP(0.3), hf.TopPLogitsWarper(0.3))]
    for ours, theirs in pairs:
        torch.testing.assert_close(ours(ids, scores.clone()), theirs(ids, scores.clone()),
                                   rtol=0, atol=0, msg=str(ours))


def test_presence_frequency_penalty_against_counts():
    ids = torch.tensor([[4, 4, 1, 2, 2, 2]])
    p = PresenceFrequencyPenalty(presence=0.5, frequency=0.25)
    p.start(prompt_length=2)  # generated part: 1, 2, 2, 2
    out = p(ids, torch.zeros(1, 5))
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0, 0.0]]


@pytest.fixture(scope="module")
def llama():
    m = tiny_llama(23)
    m.generation_config.pad_token_id = 0
    return m


CASES = [(None, 1.0, False), (5, 1.0, False), (5, 0.5, True), (7, 2.0, "never"),
         (9, -1.0, False)]


@pytest.mark.parametrize("eos,lp,early", CASES)
def test_beam_search_matches_transformers(llama, eos, lp, early):
    for seed in range(3):
        p = torch.randint(3, 23, (1, 6), generator=torch.Generator().manual_seed(seed))
        for nb in (3, 4):
            ref = llama.generate(p, max_new_tokens=12, num_beams=nb, do_sample=False,
                                 eos_token_id=eos, length_penalty=lp, early_stopping=early,
                                 num_return_sequences=2, repetition_penalty=1.3,
                                 output_scores=True, return_dict_in_generate=True)
            ours = generate(llama, p, 12, strategy="beam", num_beams=nb, eos_token_id=eos,
                            length_penalty=lp, early_stopping=early, num_return_sequences=2,
                            repetition_penalty=1.3, pad_token_id=eos if eos is not None else 0)
            assert ours.tokens.tolist() == ref.sequences[:, 6:].tolist()
            torch.testing.assert_close(ours.sequences_scores, ref.sequences_scores)


def test_beam_search_stops_at_eos(llama):
    p = torch.randint(3, 23, (1, 6), generator=torch.Generator().manual_seed(1))
    free = generate(llama, p, 12, strategy="beam", num_beams=4).tokens[0].tolist()
    eos = free[3]
    out = generate(llama, p, 12, strategy="beam", num_beams=4, eos_token_id=eos,
                   num_return_sequences=4).tokens
    assert any(eos in row.tolist() for row in out)


def test_diverse_beam_with_zero_diversity_equals_independent_searches(llama):
    p = torch.randint(3, 23, (1, 7), generator=torch.Generator().manual_seed(4))
    single = generate(llama, p, 10, strategy="beam", num_beams=3, num_return_sequences=3,
                      eos_token_id=5, length_penalty=0.8)
    dbs = generate(llama, p, 10, strategy="diverse_beam", num_beams=6, num_beam_groups=2,
                   diversity_penalty=0.0, num_return_sequences=6, eos_token_id=5,
                   length_penalty=0.8)
    expected = [row for row in single.tokens.tolist() for _ in range(2)]
    assert dbs.tokens.tolist() == expected
    torch.testing.assert_close(dbs.sequences_scores, single.sequences_scores.repeat_interleave(2))


def test_diverse_beam_hamming_penalty_separates_groups(llama):
    p = torch.randint(3, 23, (1, 7), generator=torch.Generator().manual_seed(4))
    plain = generate(llama, p, 6, strategy="diverse_beam", num_beams=4, num_beam_groups=4,
                     diversity_penalty=0.0, num_return_sequences=4)
    assert len({row[0] for row in plain.tokens.tolist()}) == 1  # every group picks the same
    diverse = generate(llama, p, 6, strategy="diverse_beam", num_beams=4, num_beam_groups=4,
                       diversity_penalty=1e4, num_return_sequences=4)
    assert len({row[0] for row in diverse.tokens.tolist()}) == 4  # each group avoids the others


@pytest.mark.parametrize("strategy,kw", [
    ("beam", {"num_beams": 3, "eos_token_id": 5, "repetition_penalty": 1.3}),
    ("diverse_beam", {"num_beams": 4, "num_beam_groups": 2, "diversity_penalty": 0.7,
                      "length_penalty": 0.5})])
def test_batched_rows_equal_one_row_at_a_time(llama, strategy, kw):
    g = torch.Generator().manual_seed(9)
    ps = torch.randint(3, 23, (3, 6), generator=g)
    n = kw["num_beams"]
    batch = generate(llama, ps, 10, strategy=strategy, num_return_sequences=n, **kw)
    for r in range(3):
        one = generate(llama, ps[r:r + 1], 10, strategy=strategy, num_return_sequences=n, **kw)
        width = one.tokens.shape[1]
        assert batch.tokens[r * n:(r + 1) * n, :width].tolist() == one.tokens.tolist()
        torch.testing.assert_close(batch.sequences_scores[r * n:(r + 1) * n],
                                   one.sequences_scores)


def test_bad_arguments():
    m = tiny_llama(23)
    p = torch.tensor([[3, 4]])
    with pytest.raises(ValueError, match="num_beam_groups"):
        generate(m, p, 4, strategy="diverse_beam", num_beams=4, num_beam_groups=3)
    with pytest.raises(ValueError, match="strategy"):
        generate(m, p, 4, strategy="nucleus")
    with pytest.raises(ValueError, match="speculative"):
        generate(m, p, 4, speculative="medusa")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(m, p, -1)
