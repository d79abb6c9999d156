"""RecurrentLM: parallel == step-by-step, chunks == one pass, lengths, a hand-computed oracle,
config round trip, state reordering, bad input, and that a few training steps reduce the loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recurra.layers import RecurrentLayer, register
from recurra.models import RecurrentLM, build_model, model_config


pytestmark = pytest.mark.usefixtures("one_thread")

STAND_IN = "test-tanh-rnn"


class TanhRNN(RecurrentLayer):
    """A tiny Elman layer written as a loop; keeps torch.nn's state layout (batch on axis 1)."""

    state_batch_dim = 1

    def __init__(self, d_model: int):
        super().__init__()
        self.input_size = self.output_size = d_model
        self.w_in = nn.Linear(d_model, d_model)
        self.w_rec = nn.Linear(d_model, d_model, bias=False)
        with torch.no_grad():
            self.w_rec.weight.mul_(0.5)

    def state_shapes(self, batch_size):
        return [(1, batch_size, self.input_size)]

    def _forward(self, x, state, lengths):
        h = state[0][0]
        ys = []
        for t in range(x.shape[1]):
            h_new = torch.tanh(self.w_in(x[:, t]) + self.w_rec(h))
            if lengths is not None:
                live = (t < lengths).unsqueeze(-1)
                h_new = torch.where(live, h_new, h)
                ys.append(torch.where(live, h_new, torch.zeros_like(h_new)))
            else:
                ys.append(h_new)
            h = h_new
        return torch.stack(ys, 1), (h.unsqueeze(0),)


register(STAND_IN, "test stand-in: tanh Elman loop, state batch on axis 1")(TanhRNN)

REAL_LAYERS = ["lstm", "gru", "elman", "slstm"]


def layer_names():
    return [STAND_IN, *REAL_LAYERS]


def make_model(layer=STAND_IN, seed=0, **kw):
    torch.manual_seed(seed)
    options = dict(vocab_size=23, d_model=16, n_layers=2, layer=layer, mlp_ratio=2)
    options.update(kw)
    return RecurrentLM(**options).double().eval()


def tokens(batch, steps, seed=1, vocab=23):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, steps), generator=g)


@pytest.mark.parametrize("layer", layer_names())
def test_step_by_step_equals_parallel(layer):
    model = make_model(layer)
    x = tokens(3, 9)
    logits, state = model(x)
    assert logits.shape == (3, 9, 23)
    s = model.init_state(3, dtype=torch.float64)
    outs = []
    for t in range(9):
        out, s = model.step(x[:, t], s)
        outs.append(out)
    torch.testing.assert_close(torch.stack(outs, 1), logits, atol=1e-10, rtol=1e-10)
    for a, b in zip(state, s):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layer", layer_names())
def test_chunks_with_carried_state_equal_one_pass(layer):
    model = make_model(layer)
    x = tokens(2, 13)
    logits, state = model(x)
    parts, s = [], None
    for lo, hi in ((0, 4), (4, 5), (5, 13)):
        out, s = model(x[:, lo:hi], s)
        parts.append(out)
    torch.testing.assert_close(torch.cat(parts, 1), logits, atol=1e-10, rtol=1e-10)
    for a, b in zip(state, s):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("layer", layer_names())
def test_lengths_match_per_sequence_runs(layer):
    model = make_model(layer)
    x = tokens(3, 7)
    lengths = torch.tensor([7, 3, 0])
    logits, state, hidden = model(x, lengths=lengths, return_hidden=True)
    assert hidden.shape == (3, 7, 16)
    batch_dim = model.blocks[0].mixer.state_batch_dim
    for b in range(3):
        n = int(lengths[b])
        empty = model.init_state(1, dtype=torch.float64)
        if n:
            ref_logits, ref_state = model(x[b:b + 1, :n])
            torch.testing.assert_close(logits[b, :n], ref_logits[0], atol=1e-10, rtol=1e-10)
        else:
            ref_state = empty
        assert torch.all(logits[b, n:] == 0) and torch.all(hidden[b, n:] == 0)
        for a, r in zip(state, ref_state):
            for u, v in zip(a, r):
                torch.testing.assert_close(u.narrow(batch_dim, b, 1), v, atol=1e-10, rtol=1e-10)


def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_logits_match_hand_computed_oracle():
    """The architecture written out by hand: embed, pre-norm residual blocks, final norm, tied head."""
    model = make_model(n_layers=2, mlp_ratio=2)
    with torch.no_grad():  # non-trivial norm weights so they are exercised
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    x = tokens(2, 5)
    logits, _ = model(x)
    emb = model.embedding.weight
    h = emb[x]
    for block in model.blocks:
        layer = block.mixer
        u = rms_norm(h, block.norm_mix.weight)
        s = torch.zeros(2, 16, dtype=torch.float64)
        ys = []
        for t in range(5):
            s = torch.tanh(u[:, t] @ layer.w_in.weight.T + layer.w_in.bias + s @ layer.w_rec.weight.T)
            ys.append(s)
        h = h + torch.stack(ys, 1)
        v = rms_norm(h, block.norm_mlp.weight)
        mid = F.gelu(v @ block.mlp.up.weight.T + block.mlp.up.bias)
        h = h + mid @ block.mlp.down.weight.T + block.mlp.down.bias
    expected = rms_norm(h, model.norm.weight) @ emb.T
    torch.testing.assert_close(logits, expected, atol=1e-10, rtol=1e-10)
    assert model.head.weight is model.embedding.weight


def test_untied_and_no_mlp():
    model = make_model(tie_weights=False, mlp_ratio=0)
    assert model.head.weight is not model.embedding.weight
    assert all(b.mlp is None for b in model.blocks)
    logits, _ = model(tokens(1, 4))
    assert logits.shape == (1, 4, 23)


def test_config_rebuilds_the_model():
    model = make_model(layer_options={}, dropout=0.1)
    config = model_config(model)
    assert config["architecture"] == "recurrent" and config["layer"] == STAND_IN
    clone = build_model(config).double().eval()
    clone.load_state_dict(model.state_dict())
    x = tokens(2, 6)
    torch.testing.assert_close(clone(x)[0], model(x)[0], atol=0, rtol=0)
    assert sum(p.numel() for p in clone.parameters()) == model.num_parameters()


def test_reorder_state_selects_rows():
    model = make_model()
    x = tokens(3, 5)
    _, state = model(x)
    index = torch.tensor([2, 0, 2])
    reordered = model.reorder_state(state, index)
    _, ref_state = model(x[index])
    for a, b in zip(reordered, ref_state):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-10)
    # continuing the reordered state == continuing the reordered batch
    y = tokens(3, 4, seed=5)
    out_a, _ = model(y, reordered)
    out_b, _ = model(torch.cat([x[index], y], 1))
    torch.testing.assert_close(out_a, out_b[:, 5:], atol=1e-10, rtol=1e-10)


def test_bad_input_raises_value_error():
    model = make_model()
    with pytest.raises(ValueError, match="tokens must lie in"):
        model(torch.tensor([[0, 23]]))
    with pytest.raises(ValueError, match=r"tokens must be a tensor of shape \(batch, time\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="torch.long"):
        model(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="2 layer states"):
        model(tokens(1, 3), state=(model.init_state(1)[0],))
    with pytest.raises(ValueError, match="'no-such-layer'"):
        RecurrentLM(10, 8, 1, layer="no-such-layer")
    with pytest.raises(ValueError, match="d_model"):
        RecurrentLM(10, 0, 1, layer=STAND_IN)
    with pytest.raises(ValueError, match="unknown architecture 'foo'"):
        build_model({"architecture": "foo"})


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = RecurrentLM(vocab_size=8, d_model=16, n_layers=1, layer="lstm")
    pattern = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7] * 4)
    x, y = pattern[None, :-1].repeat(4, 1), pattern[None, 1:].repeat(4, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(30):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.reshape(-1, 8), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1.9  # ~ln 8 at initialisation
    assert losses[-1] < 0.2 * losses[0]
