"""A language model for layers that read a prefix non-causally (the ``jrt`` layer).

``RecurrentLM`` accepts only causal layers. The evaluation also trains prefix layers (JRT-RNN's
prefix linear attention): the same pre-norm stack (embedding -> [layer, MLP] blocks -> norm ->
tied head), built from the public ``recurra.models.recurrent_lm.Block``'s ingredients, without the
causality check. It is only used on tasks whose answers never appear among the inputs of the
prefix: before every forward pass the runner sets the prefix length of every layer that has a
``prefix_length`` attribute to the number of tokens before the first answer position
(:func:`set_prefix_length`), so the prefix is exactly the prompt, as in JRT-RNN.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PrefixLM(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, n_layers: int, layer: str,
                 layer_options: dict | None = None, mlp_ratio: float = 4,
                 tie_weights: bool = True):
        super().__init__()
        from ..layers import build

        self.embedding = nn.Embedding(vocab_size, d_model)
        self.mix_norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-6) for _ in range(n_layers))
        self.mixers = nn.ModuleList(build(layer, d_model, **(layer_options or {}))
                                    for _ in range(n_layers))
        hidden = round(mlp_ratio * d_model)
        self.mlp_norms = nn.ModuleList(nn.RMSNorm(d_model, eps=1e-6) for _ in range(n_layers))
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, d_model))
            for _ in range(n_layers))
        self.norm = nn.RMSNorm(d_model, eps=1e-6)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)
        for mlp in self.mlps:
            nn.init.normal_(mlp[0].weight, std=0.02)
            nn.init.normal_(mlp[2].weight, std=0.02 / math.sqrt(2 * n_layers))
        if tie_weights:
            self.head.weight = self.embedding.weight
        else:
            nn.init.normal_(self.head.weight, std=0.02)

    def forward(self, tokens: torch.Tensor):
        x = self.embedding(tokens)
        for norm, mixer, mlp_norm, mlp in zip(self.mix_norms, self.mixers, self.mlp_norms,
                                              self.mlps):
            x = x + mixer(norm(x))[0]
            x = x + mlp(mlp_norm(x))
        return self.head(self.norm(x)), None


def set_prefix_length(model: nn.Module, mask: torch.Tensor) -> None:
    """Give every prefix layer of ``model`` the prompt length of ``mask`` (B, T) answer positions.

    The prompt is what precedes the first answer position of any row of the batch.
    """
    first = int(mask.int().argmax(dim=1).min())
    for module in model.modules():
        if hasattr(module, "prefix_length") and isinstance(module.prefix_length, int):
            module.prefix_length = max(1, first)
