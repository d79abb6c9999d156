"""The JRT-RNN training objective: next-token loss on the suffix + masked-LM loss on the prefix.

For a model whose layers read a prefix of P tokens non-causally (``RecurrentLM`` over ``jrt``),
"Just Read Twice" (Arora et al., arXiv 2407.05483; the reference code's ``mixed`` data type)
trains with one forward pass over inputs whose prefix is partly masked:

- a random ``mask_prob`` (0.15) fraction of each row's prefix tokens is replaced by
  ``mask_token_id`` (each prefix position independently);
- next-token loss: cross-entropy of ``targets[b, t]`` (the token after ``inputs[b, t]``) at the
  suffix positions t >= P_b, averaged over them. Positions before P_b are not trained to predict
  the next token: the encoder lets them see it;
- masked-LM loss: cross-entropy of the original token ``inputs[b, t]`` at each masked prefix
  position, averaged over the masked positions (0 when none was drawn);
- total = next-token + ``mlm_weight`` (0.25) x masked-LM.

The suffix therefore reads a prefix with masked tokens during training, as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: the reference's weights: JRT-RNN trains with MLM weight 0.25 and mask rate 0.15
MLM_WEIGHT = 0.25
MASK_PROB = 0.15


@dataclass
class PrefixLMLoss:
    #: next_token + mlm_weight * masked_lm (what to back-propagate)
    total: torch.Tensor
    #: mean next-token cross-entropy over the suffix positions
    next_token: torch.Tensor
    #: mean cross-entropy of the masked prefix tokens at their positions (0 if none masked)
    masked_lm: torch.Tensor
    #: how many prefix tokens were masked, and how many suffix positions were scored
    masked_count: int
    suffix_count: int


def _row_prefix(prefix_lengths, batch: int, steps: int, device) -> torch.Tensor:
    from ..layers.jrt import check_prefix_lengths

    return check_prefix_lengths(prefix_lengths, batch, steps, device)


def mask_prefix(
    inputs: torch.Tensor,
    prefix_lengths: int | torch.Tensor,
    mask_token_id: int,
    mask_prob: float = MASK_PROB,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each prefix token (t < P_b) by ``mask_token_id`` with probability ``mask_prob``.

    Returns the corrupted inputs and the bool mask (B, T) of the replaced positions. The draw is
    ``torch.rand(B, T, generator=generator)`` on the CPU (the global generator when None).
    """
    _check_tokens("inputs", inputs)
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob!r}")
    if not isinstance(mask_token_id, int) or isinstance(mask_token_id, bool) or mask_token_id < 0:
        raise ValueError(f"mask_token_id must be an int >= 0, got {mask_token_id!r}")
    b, t = inputs.shape
    prefix = _row_prefix(prefix_lengths, b, t, inputs.device)
    in_prefix = torch.arange(t, device=inputs.device).unsqueeze(0) < prefix.unsqueeze(1)
    masked = (torch.rand(b, t, generator=generator) < mask_prob).to(inputs.device) & in_prefix
    corrupted = torch.where(masked, torch.full_like(inputs, mask_token_id), inputs)
    return corrupted, masked


def prefix_lm_loss(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    prefix_lengths: int | torch.Tensor,
    mask_token_id: int,
    mlm_weight: float = MLM_WEIGHT,
    mask_prob: float = MASK_PROB,
    generator: torch.Generator | None = None,
) -> PrefixLMLoss:
    """The JRT objective (see the module docstring) for ``model(tokens, prefix_lengths=P)``.

    ``inputs`` and ``targets`` (B, T) integer tokens, ``targets[b, t]`` the token after
    ``inputs[b, t]``; ``prefix_lengths`` an int or (B,) ints in [0, T - 1] (every row keeps at
    least one suffix position). ``model`` is called once, on the masked inputs, and must return
    ``(logits (B, T, V), ...)`` as ``RecurrentLM`` does.
    """
    _check_tokens("inputs", inputs)
    _check_tokens("targets", targets)
    if targets.shape != inputs.shape:
        raise ValueError(f"targets must have the shape of inputs {tuple(inputs.shape)}, got "
                         f"{tuple(targets.shape)}")
    if not mlm_weight >= 0:
        raise ValueError(f"mlm_weight must be >= 0, got {mlm_weight!r}")
    b, t = inputs.shape
    prefix = _row_prefix(prefix_lengths, b, t, inputs.device)
    if int(prefix.max()) >= t:
        raise ValueError(f"prefix_lengths must be < the sequence length {t} (the next-token "
                         f"loss needs a suffix), got {int(prefix.max())}")
    corrupted, masked = mask_prefix(inputs, prefix, mask_token_id, mask_prob, generator)
    logits = model(corrupted, prefix_lengths=prefix)[0]
    if logits.dim() != 3 or logits.shape[:2] != inputs.shape:
        raise ValueError(f"model must return logits of shape {tuple(inputs.shape)} + (V,), got "
                         f"{tuple(logits.shape)}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    suffix = torch.arange(t, device=inputs.device).unsqueeze(0) >= prefix.unsqueeze(1)
    next_token = F.cross_entropy(logits[suffix], targets[suffix])
    n_masked = int(masked.sum())
    if n_masked:
        masked_lm = F.cross_entropy(logits[masked], inputs[masked])
    else:
        masked_lm = logits.new_zeros(())
    return PrefixLMLoss(next_token + mlm_weight * masked_lm, next_token, masked_lm, n_masked,
                        int(suffix.sum()))


def _check_tokens(name: str, tokens) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor of shape (batch, time), got "
                         f"{getattr(tokens, 'shape', type(tokens).__name__)}")
