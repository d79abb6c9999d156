"""Stateful truncated back-propagation: a token sequence read as parallel contiguous streams.

The sequence is cut into ``n_streams`` equal contiguous pieces (the remainder is dropped). Batch
``k`` of an epoch holds, for every stream, tokens ``[k*T, k*T + T)`` as input and the same window
shifted by one as target, so consecutive batches continue each stream and a recurrent model can
carry its state from one batch to the next. With data parallelism the streams are numbered
globally and rank r reads streams ``[r*B, (r+1)*B)``: N ranks with B streams each see exactly the
batches one process with N*B streams would see.
"""

from __future__ import annotations

import torch


class TokenStreams:
    def __init__(self, tokens: torch.Tensor, n_streams: int, seq_len: int, first: int = 0,
                 count: int | None = None):
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tuple(tokens.shape)}")
        if n_streams < 1 or seq_len < 1:
            raise ValueError(f"n_streams and seq_len must be >= 1, got {n_streams}, {seq_len}")
        count = n_streams - first if count is None else count
        if first < 0 or count < 1 or first + count > n_streams:
            raise ValueError(f"streams [{first}, {first + count}) do not lie in [0, {n_streams})")
        length = tokens.shape[0] // n_streams
        if length < seq_len + 1:
            raise ValueError(
                f"the text ({tokens.shape[0]:,} tokens) is too short for {n_streams} streams of "
                f"seq_len + 1 = {seq_len + 1} tokens; use a smaller batch size or seq_len, or "
                f"more text"
            )
        self.seq_len = seq_len
        self.stream_length = length
        self.streams = tokens[: n_streams * length].view(n_streams, length)[first:first + count]
        #: batches before the streams run out and start over (the state is reset then)
        self.batches_per_epoch = (length - 1) // seq_len

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """Inputs and targets (count, seq_len) of global batch ``index``, and whether it starts
        an epoch (the carried state must be reset)."""
        k = index % self.batches_per_epoch
        lo = k * self.seq_len
        x = self.streams[:, lo:lo + self.seq_len].long()
        y = self.streams[:, lo + 1:lo + self.seq_len + 1].long()
        return x, y, k == 0
