"""Validation: the model's loss in nats and bits per byte, and a unigram baseline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def stream_targets(tokens: torch.Tensor, n_streams: int) -> torch.Tensor:
    """The tokens predicted when ``tokens`` is read as ``n_streams`` streams (all but the first of
    each stream; the remainder beyond ``n_streams * (len // n_streams)`` is dropped)."""
    n_streams = max(1, min(n_streams, tokens.shape[0] // 2))
    length = tokens.shape[0] // n_streams
    return tokens[: n_streams * length].view(n_streams, length)[:, 1:]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, tokens: torch.Tensor, n_streams: int, seq_len: int,
                  device: torch.device, stateful: bool = True) -> float:
    """Mean next-token cross-entropy (nats) over ``tokens`` read as ``n_streams`` streams.

    A stateful (recurrent) model carries its state across windows of ``seq_len``, so every
    prediction sees the whole stream before it; otherwise each window starts afresh.
    """
    was_training = model.training
    model.eval()
    n_streams = max(1, min(n_streams, tokens.shape[0] // 2))
    length = tokens.shape[0] // n_streams
    streams = tokens[: n_streams * length].view(n_streams, length).to(device)
    total, count, state = 0.0, 0, None
    for lo in range(0, length - 1, seq_len):
        hi = min(lo + seq_len, length - 1)
        x, y = streams[:, lo:hi].long(), streams[:, lo + 1:hi + 1].long()
        if stateful:
            logits, state = model(x, state)
        else:
            logits = model(x)[0]
        total += F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def evaluate_prefix_loss(model: torch.nn.Module, tokens: torch.Tensor, n_streams: int,
                         seq_len: int, prefix_length: int, device: torch.device) -> float:
    """Mean next-token cross-entropy (nats) on the suffixes, for JRT prefix training.

    ``tokens`` is read as ``n_streams`` streams cut into windows of ``seq_len`` tokens; each
    window is a fresh sequence whose first ``prefix_length`` tokens (clean, unmasked) are the
    prefix, and the predictions scored are those at positions ``prefix_length .. seq_len - 1``
    (what training scores). A last window shorter than ``prefix_length + 1`` is skipped; on a
    short text fewer streams are read, so that each holds a window with a suffix.
    """
    was_training = model.training
    model.eval()
    n_streams = max(1, min(n_streams, tokens.shape[0] // (prefix_length + 2)))
    length = tokens.shape[0] // n_streams
    streams = tokens[: n_streams * length].view(n_streams, length).to(device)
    total, count = 0.0, 0
    for lo in range(0, length - 1, seq_len):
        hi = min(lo + seq_len, length - 1)
        if hi - lo <= prefix_length:
            break
        x, y = streams[:, lo:hi].long(), streams[:, lo + 1:hi + 1].long()
        logits = model(x, prefix_lengths=prefix_length)[0][:, prefix_length:]
        y = y[:, prefix_length:]
        total += F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]),
                                 y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    if count == 0:
        raise ValueError(f"the validation text is too short for one window of more than "
                         f"prefix_length={prefix_length} tokens per stream")
    return total / count


def unigram_bits_per_byte(train: torch.Tensor, targets: torch.Tensor, vocab_size: int = 256) -> float:
    """Bits per token of the add-one-smoothed unigram distribution of ``train`` on ``targets``."""
    counts = torch.bincount(train.long().flatten(), minlength=vocab_size).double() + 1
    log_p = counts.log() - counts.sum().log()
    return float(-log_p[targets.long().flatten()].mean() / math.log(2))


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Losses of half-precision logits are computed in float32; float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def bits(nats: float) -> float:
    return nats / math.log(2)
