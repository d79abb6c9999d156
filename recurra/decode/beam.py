"""Beam search, Diverse Beam Search and conditional (attribute-guided) beam search.

Beam search follows transformers' (>= 4.50) vectorised beam search, so that the same model gives
the same beams: scores are float32 log-softmax sums; each step keeps the top ``2 * num_beams``
continuations (more with several EOS ids); those that end (EOS or the token budget) among the
first ``num_beams`` enter the finished set with score ``sum_logp / generated_length **
length_penalty``; the best ``num_beams`` unfinished continue; ``early_stopping`` (False, True or
"never") decides when the finished set can no longer improve. Unlike transformers, the prompt is
prefilled once and the cache / state is expanded to the beams (``session.reorder``).

Diverse Beam Search (Vijayakumar et al. 2016) splits the beams into ``num_beam_groups`` groups
decoded one after another at each step; group g's log-probabilities are reduced by
``diversity_penalty x`` the number of times each token was chosen at this step by groups
< g (Hamming diversity). With ``diversity_penalty=0`` the groups are independent beam searches.

Conditional beam search (Yoshida et al., arXiv 2311.08817) ranks beams by
``log p(y) + attribute_weight * log P(attribute | prefix)`` where an attribute classifier reads
the model's final hidden state of the prefix (see :mod:`recurra.decode.conditional_beam`). The
classifier term of a candidate is that of its parent prefix (the hidden state of the candidate
token itself only exists after the next forward), and it enters the ranking only, not the
accumulated log-probability.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .stats import DecodeStats


class _Group:
    """The running and finished beams of one group (batch row 1)."""

    def __init__(self, k: int, device):
        self.k = k
        self.running = torch.zeros(k, 0, dtype=torch.long, device=device)
        self.running_scores = torch.zeros(k, device=device)
        self.running_scores[1:] = -1e9
        self.finished = [[] for _ in range(k)]
        self.finished_scores = torch.full((k,), -1e9, device=device)
        self.is_finished = torch.zeros(k, dtype=torch.bool, device=device)
        self.improvable = True
        self.done = False


def beam_generate(adapter, input_ids: torch.Tensor, max_new_tokens: int,
                  strategy: str = "beam", eos_token_ids: Sequence[int] = (),
                  pad_token_id: int | None = None, processors=None, num_beams: int = 4,
                  length_penalty: float = 1.0, early_stopping: bool | str = False,
                  num_return_sequences: int = 1, num_beam_groups: int = 1,
                  diversity_penalty: float = 0.0, attribute_classifier=None,
                  attribute_weight: float = 1.0, stats: DecodeStats | None = None):
    """Returns (tokens (B * num_return_sequences, n), scores (B * num_return_sequences,))."""
    if not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
    if strategy != "diverse_beam":
        num_beam_groups, diversity_penalty = 1, 0.0
    if not isinstance(num_beam_groups, int) or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beam_groups must divide num_beams ({num_beams}), got "
                         f"{num_beam_groups!r}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must lie in [1, num_beams={num_beams}], got "
                         f"{num_return_sequences}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if strategy == "conditional_beam" and attribute_classifier is None:
        raise ValueError("strategy='conditional_beam' needs attribute_classifier=")
    stats = stats if stats is not None else DecodeStats()
    eos = list(eos_token_ids)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    rows, scores = _beam_rows(adapter, input_ids, max_new_tokens, eos, pad, processors,
                              num_beams, length_penalty, early_stopping, num_return_sequences,
                              num_beam_groups, diversity_penalty,
                              attribute_classifier if strategy == "conditional_beam" else None,
                              attribute_weight, stats)
    width = max((len(r) for r in rows), default=0)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens, torch.tensor(scores)


@torch.no_grad()
def _beam_rows(adapter, prompts, max_new_tokens, eos, pad, processors, num_beams,
               length_penalty, early_stopping, num_return, groups, diversity, classifier,
               weight, stats):
    """All batch rows at once: the prompts are prefilled once (B rows), the cache is expanded to
    B x num_beams rows, and every step runs all rows' beams in one forward. A finished row's
    beams keep running (on a pad token) until every row is done; their scores are ignored."""
    rows = prompts.shape[0]
    if max_new_tokens == 0:
        return [[] for _ in range(rows * num_return)], [0.0] * (rows * num_return)
    device = adapter.device
    k = num_beams // groups
    session = adapter.new_session()
    want_hidden = classifier is not None
    prompts = prompts.to(device)
    out = session.append(prompts, return_hidden=want_hidden, logits_to_keep=1)
    logits, hidden = (out[0][:, -1], out[1][:, -1]) if want_hidden else (out[:, -1], None)
    expand = torch.arange(rows, device=device).repeat_interleave(num_beams)
    session.reorder(expand)
    logits = logits[expand]
    if hidden is not None:
        hidden = hidden[expand]
    prompt_ids = prompts[expand]
    state = [[_Group(k, device) for _ in range(groups)] for _ in range(rows)]
    row_done = [False] * rows
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    keep = max(2, 1 + len(eos)) * k
    top_mask = torch.arange(keep, device=device) < k
    pad_column = torch.full((k, 1), pad, dtype=torch.long, device=device)
    generated = 0
    while True:
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        if processors:
            ids = torch.cat((prompt_ids, torch.cat([g.running for gs in state for g in gs])),
                            dim=1)
            log_probs = processors(ids, log_probs)
        bonus = None
        if classifier is not None:
            bonus = weight * torch.nn.functional.logsigmoid(
                classifier(hidden.float()).reshape(-1))
        vocab = log_probs.shape[-1]
        sources = []
        for b in range(rows):
            base = b * num_beams
            if row_done[b]:  # keep the shapes: beams stay put on a pad token
                for gi, g in enumerate(state[b]):
                    g.running = torch.cat((g.running, pad_column), dim=1)
                    sources.append(base + gi * k + torch.arange(k, device=device))
                continue
            chosen_this_step = torch.zeros(vocab, device=device)
            for gi, g in enumerate(state[b]):
                lo, hi = base + gi * k, base + (gi + 1) * k
                lp = log_probs[lo:hi]
                if diversity and gi:
                    lp = lp - diversity * chosen_this_step
                acc = lp + g.running_scores[:, None]
                rank = acc if bonus is None else acc + bonus[lo:hi, None]
                rank_top, flat = torch.topk(rank.reshape(-1), keep)
                top_scores = acc.reshape(-1)[flat]
                src, tok = flat // vocab, flat % vocab
                cand = torch.cat((g.running[src], tok[:, None]), dim=1)
                hits = torch.isin(tok, eos_t) | (generated + 1 >= max_new_tokens)
                # running beams for the next step
                run_rank = rank_top + hits.to(torch.float32) * -1.0e9
                nxt = torch.topk(run_rank, k).indices
                new_running, new_scores = cand[nxt], (top_scores + hits.float() * -1.0e9)[nxt]
                # finished beams
                fin = top_scores / ((generated + 1) ** length_penalty)
                if bonus is not None:
                    fin = fin + bonus[lo:hi][src]
                if bool(g.is_finished.all()) and early_stopping is True:
                    fin = fin - 1.0e9
                if not g.improvable:
                    fin = fin - 1.0e9
                just = hits & top_mask
                fin = fin + (~just).float() * -1.0e9
                merged = torch.cat((g.finished_scores, fin))
                sel = torch.topk(merged, k).indices.tolist()
                merged_done = torch.cat((g.is_finished, just))
                g.finished = [g.finished[i] if i < k else cand[i - k].tolist() for i in sel]
                g.finished_scores = merged[sel]
                g.is_finished = merged_done[sel]
                g.running, g.running_scores = new_running, new_scores
                g.hits_all = bool(hits.all())
                sources.append(lo + src[nxt])
                chosen_this_step += torch.bincount(new_running[:, -1], minlength=vocab).float()
        generated += 1
        for b in range(rows):
            if row_done[b]:
                continue
            for g in state[b]:
                if early_stopping == "never" and length_penalty > 0.0:
                    best_len = max_new_tokens
                else:
                    best_len = generated
                best = g.running_scores[0] / (best_len ** length_penalty)
                worst = torch.where(g.is_finished, g.finished_scores.min(),
                                    torch.tensor(-1.0e9, device=device))
                g.improvable = g.improvable and bool((best > worst).any())
                g.done = (not g.improvable
                          or (bool(g.is_finished.all()) and early_stopping is True)
                          or g.hits_all)
            row_done[b] = all(g.done for g in state[b])
        if all(row_done):
            break
        session.reorder(torch.cat(sources))
        last = torch.cat([g.running[:, -1] for gs in state for g in gs])[:, None]
        out = session.append(last, return_hidden=want_hidden)
        stats.steps += 1
        if want_hidden:
            logits, hidden = out[0][:, -1], out[1][:, -1]
        else:
            logits = out[:, -1]
    seqs, scores = [], []
    for b in range(rows):
        finals = [(float(s), seq) for g in state[b]
                  for s, seq in zip(g.finished_scores.tolist(), g.finished)]
        best = finals[:num_return] if groups == 1 else sorted(finals, key=lambda x: -x[0])[
            :num_return]
        seqs += [seq for _, seq in best]
        scores += [s for s, _ in best]
    return seqs, scores
