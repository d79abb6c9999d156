"""paragru / paralstm layers: the layer contract in both modes, modes agree, registry, LM use."""

import math

import pytest
import torch

from recurra.layers.paragru import ParaGRU
from recurra.layers.paralstm import ParaLSTM
from recurra.testing import check_layer_contract

LAYERS = {"paragru": ParaGRU, "paralstm": ParaLSTM}
F64 = torch.float64


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_layer_contract(name, mode):
    torch.manual_seed(0)
    check_layer_contract(LAYERS[name](6, num_heads=2, mode=mode, recurrent_std=0.5))


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_contract_parallel_one_head(name):
    torch.manual_seed(1)
    check_layer_contract(LAYERS[name](4, mode="parallel"), steps=12)


@pytest.mark.parametrize("name", list(LAYERS))
def test_modes_compute_the_same_function(name):
    torch.manual_seed(2)
    layer = LAYERS[name](8, num_heads=2, recurrent_std=0.8).double()
    x = torch.randn(3, 300, 8, dtype=F64, requires_grad=True)
    lengths = torch.tensor([300, 17, 211])
    state = tuple(0.3 * torch.randn(s, dtype=F64) for s in layer.state_shapes(3))
    outs = {}
    for mode in ["sequential", "parallel"]:
        layer.mode = mode
        y, s = layer(x, state, lengths)
        loss = (y * torch.cos(torch.arange(8.0, dtype=F64))).sum() + sum(t.sum() for t in s)
        outs[mode] = (y, s, torch.autograd.grad(loss, [x, *layer.parameters()]))
    (y1, s1, g1), (y2, s2, g2) = outs["sequential"], outs["parallel"]
    torch.testing.assert_close(y2, y1, atol=1e-10, rtol=0)
    for a, b in zip(s2, s1):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)
    assert layer.solver.last.converged and not layer.solver.last.fell_back


def test_fixed_three_iterations_float32():
    torch.manual_seed(3)
    layer = ParaGRU(16, iterations=3)
    x = torch.randn(2, 2048, 16)
    with torch.no_grad():
        y_par, _ = layer(x)
        layer.mode = "sequential"
        y_seq, _ = layer(x)
    assert layer.solver.last.iterations == 3
    assert (y_par - y_seq).abs().max() < 1e-2


@pytest.mark.parametrize("kwargs,name", [
    (dict(mode="fast"), "mode"), (dict(num_heads=3), "num_heads"),
    (dict(iterations=3, atol=1e-3), "either iterations"),
])
def test_bad_options(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ParaGRU(8, **kwargs)


def test_registered_and_in_language_model():
    from recurra.layers import build, describe
    from recurra.models.recurrent_lm import RecurrentLM

    assert "paragru" in describe() and "paralstm" in describe()
    assert isinstance(build("paralstm", 8, mode="sequential"), ParaLSTM)
    torch.manual_seed(4)
    model = RecurrentLM(vocab_size=11, d_model=8, n_layers=2, layer="paragru",
                        layer_options={"mode": "parallel", "num_heads": 2})
    tokens = torch.randint(0, 11, (2, 40))
    logits, _ = model(tokens)
    assert logits.shape == (2, 40, 11)
    for block in model.modules():
        if isinstance(block, ParaGRU):
            block.mode = "sequential"
    logits_seq, _ = model(tokens)
    torch.testing.assert_close(logits, logits_seq, atol=1e-5, rtol=0)


def _train_curve(mode: str, steps: int, seed: int = 0):
    from recurra.models.recurrent_lm import RecurrentLM

    torch.manual_seed(seed)
    model = RecurrentLM(vocab_size=16, d_model=32, n_layers=2, layer="paragru",
                        layer_options={"mode": mode, "num_heads": 4})
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        # a learnable synthetic stream: every token repeats the one 3 places earlier
        head = torch.randint(0, 16, (8, 3), generator=gen)
        tokens = head.repeat(1, 22)[:, :65]
        logits, _ = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 16),
                                                 tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_training_parallel_matches_sequential_loss_curve():
    steps = 300
    seq = _train_curve("sequential", steps)
    par = _train_curve("parallel", steps)
    assert seq[-1] < 0.5 * seq[0], "the task must be learnt for the comparison to mean much"
    diff = max(abs(a - b) for a, b in zip(seq, par))
    # measured on the 2-core CPU: max |loss difference| over the 300 steps = 7.2e-7 (float32;
    # loss 2.74 -> 0.17); the bound leaves room for other BLAS/rounding orders
    assert diff < 1e-5, diff
    assert all(math.isfinite(v) for v in par)
