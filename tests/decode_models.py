"""Tiny models shared by the decoding tests (float64, CPU, random weights, no downloads)."""

from __future__ import annotations

import torch
from torch import nn


class TinyRecurrentLM(nn.Module):
    """A stand-in recurrent LM with RecurrentLM's interface (GRU + tied-free head)."""

    def __init__(self, vocab_size=23, d=16, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.config = {"vocab_size": vocab_size}
        self.embedding = nn.Embedding(vocab_size, d)
        self.cell = nn.GRUCell(d, d)
        self.head = nn.Linear(d, vocab_size)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 1.5)
        self.double()

    def init_state(self, batch_size, device=None, dtype=None):
        return (torch.zeros(batch_size, self.cell.hidden_size, dtype=torch.float64),)

    def reorder_state(self, state, index):
        return tuple(s.index_select(0, index) for s in state)

    def step(self, token, state=None):
        if state is None:
            state = self.init_state(token.shape[0])
        h = self.cell(self.embedding(token), state[0])
        return self.head(h), (h,)

    def forward(self, tokens, state=None, lengths=None, return_hidden=False):
        b, t = tokens.shape
        h = (state or self.init_state(b))[0]
        outs = []
        for i in range(t):
            h_new = self.cell(self.embedding(tokens[:, i]), h)
            if lengths is not None:
                live = (i < torch.as_tensor(lengths)).unsqueeze(1)
                h_new = torch.where(live, h_new, h)
                outs.append(torch.where(live, h_new, torch.zeros_like(h_new)))
            else:
                outs.append(h_new)
            h = h_new
        hidden = torch.stack(outs, 1)
        logits = self.head(hidden)
        return (logits, (h,), hidden) if return_hidden else (logits, (h,))


def tiny_transformer(vocab_size=23, seed=0, **kw):
    from recurra.models.transformer_lm import TransformerLM

    torch.manual_seed(seed)
    m = TransformerLM(vocab_size, 32, 2, n_heads=4, max_len=512, **kw).double().eval()
    with torch.no_grad():  # sharper than the default init, so greedy outputs vary
        m.embedding.weight.mul_(50)
    return m


def tiny_llama(vocab_size=23, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0)
    m = LlamaForCausalLM(cfg).double().eval()
    with torch.no_grad():
        m.model.embed_tokens.weight.mul_(50)
    return m


import pytest


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models are fastest (and immune to a busy machine) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
