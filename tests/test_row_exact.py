"""Row-exact inference (recurra.ops.row_exact): under no_grad on the CPU, a small many-row call
gives every row bitwise what a one-row call (step) gives it, for the classic cells, RecurrentLM
and the recurrent decoding adapter. Oracle: the per-row step loop, compared with torch.equal
(with BLAS products, every one of these comparisons fails: checked by setting EXACT_ROWS = 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recurra.decode import DraftTree, generate
from recurra.decode import recurrent_adapter as adapter_module
from recurra.decode.recurrent_adapter import RecurrentAdapter
from recurra.layers import build
from recurra.models import RecurrentLM
from recurra.ops import recurrent_compiled, row_exact
from recurra.ops.recurrent_fused import recurrence

pytestmark = pytest.mark.skipif(not row_exact.available(),
                                reason="the compiled kernels do not build here")

CELLS = [("lstm", {}), ("gru", {}), ("elman", {}), ("slstm", {}),
         ("lstm", {"num_heads": 4}), ("gru", {"num_heads": 2, "num_layers": 2}),
         ("elman", {"nonlinearity": "relu", "bias": False}), ("slstm", {"num_heads": 2})]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cell,options", CELLS)
def test_cell_forward_rows_equal_steps_bitwise(cell, options, dtype):
    torch.manual_seed(0)
    layer = build(cell, 72, **options).to(dtype).eval()
    B, T = 9, 6
    lengths = torch.tensor([6, 1, 4, 6, 0, 5, 2, 6, 3])
    x = torch.randn(B, T, 72, dtype=dtype)
    s0 = tuple(torch.rand_like(s) + 0.5 for s in layer.init_state(B))  # sLSTM: n > 0
    with torch.no_grad():
        y, final = layer(x, s0, lengths=lengths)
        y_states, final_states, states = layer.forward_states(x, s0, lengths=lengths)
        assert torch.equal(y_states, y)
        for b in range(B):
            s = layer.reorder_state(s0, torch.tensor([b]))
            for t in range(int(lengths[b])):
                y_t, s = layer.step(x[b:b + 1, t], s)
                assert torch.equal(y_t[0], y[b, t]), (cell, b, t)
                for got, want in zip(layer.state_at(states, [b], [t]), s):  # forward_states
                    assert torch.equal(got, want), (cell, b, t)
            for got, want, got2 in zip(final, s, final_states):
                assert torch.equal(got.select(1, b), want.select(1, 0)), (cell, b)
                assert torch.equal(got2.select(1, b), want.select(1, 0)), (cell, b)
    # with gradients on, the same function through BLAS (to rounding), states over time too
    y_grad, _ = layer(x, s0, lengths=lengths)
    torch.testing.assert_close(y_grad, y)
    _, _, states_grad = layer.forward_states(x, s0, lengths=lengths)
    rows, times = torch.arange(B), (lengths - 1).clamp(min=0)
    for got, want in zip(layer.state_at(states_grad, rows, times), final):
        live = lengths > 0
        torch.testing.assert_close(got[:, live], want[:, live])


def test_forward_states_errors():
    with pytest.raises(ValueError, match="bidirectional"):
        build("lstm", 8, bidirectional=True).forward_states(torch.randn(1, 2, 8))
    with pytest.raises(ValueError, match="states_over_time is False"):
        lstm_lm("mamba2").forward_states(torch.zeros(1, 3, dtype=torch.long))
    assert lstm_lm().states_over_time and not lstm_lm("mamba2").states_over_time


def test_cell_exact_path_is_the_compiled_loop_with_panels():
    """The panels path of the C++ loop against the fused Python loop, and its guards."""
    torch.manual_seed(1)
    T, N, B, dh = 5, 2, 3, 16
    wx = torch.randn(T, N, B, 4 * dh, dtype=torch.float64)
    r = torch.randn(N, dh, 4 * dh, dtype=torch.float64) / 4
    s0 = (torch.randn(N, B, dh, dtype=torch.float64), torch.randn(N, B, dh, dtype=torch.float64))
    with torch.no_grad():
        got = recurrence("lstm", wx, r, s0, backend="compiled",
                         panels=recurrent_compiled.pack_recurrent(r))
        want = recurrence("lstm", wx, r, s0, backend="fused")
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="backend='compiled'"):
        recurrence("lstm", wx, r, s0, backend="fused", panels=recurrent_compiled.pack_recurrent(r))
    with pytest.raises(ValueError, match="inference only"):
        recurrence("lstm", wx.requires_grad_(), r, s0, backend="compiled",
                   panels=recurrent_compiled.pack_recurrent(r))


def test_linear_rule_and_values():
    torch.manual_seed(2)
    w, b = torch.randn(70, 48), torch.randn(70)
    x = torch.randn(2, 11, 48)
    with torch.no_grad():
        got = row_exact.linear(x, w, b)
        rows = torch.stack([row_exact.linear(x[i, j:j + 1], w, b)[0]
                            for i in range(2) for j in range(11)]).view(2, 11, 70)
        assert torch.equal(got, rows)
        torch.testing.assert_close(got, F.linear(x, w, b))
        assert row_exact.applies(x, row_exact.EXACT_ROWS)
        assert not row_exact.applies(x, row_exact.EXACT_ROWS + 1)
        assert not row_exact.applies(x.half(), 4)
    assert not row_exact.applies(x, 4)  # gradients on: BLAS
    with torch.no_grad(), pytest.raises(ValueError, match="x \\(..., 48\\)"):
        row_exact.linear(torch.randn(3, 47), w)


def lstm_lm(layer="lstm", **options):
    torch.manual_seed(3)
    model = RecurrentLM(41, 64, 2, layer=layer, layer_options=options, mlp_ratio=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # sharper, so greedy outputs vary
    return model


def test_recurrent_lm_forward_rows_equal_steps_bitwise():
    model = lstm_lm()
    assert model.row_exact
    assert not lstm_lm("mamba2").row_exact
    assert not lstm_lm(backend="fused").row_exact
    tokens = torch.randint(0, 41, (5, 8))
    lengths = torch.tensor([8, 3, 1, 8, 6])
    with torch.no_grad():
        _, s0 = model(torch.randint(0, 41, (1, 30)))
        logits, _ = model(tokens, model.reorder_state(s0, torch.zeros(5).long()),
                                  lengths=lengths)
        for b in range(5):
            s = s0
            for t in range(int(lengths[b])):
                step_logits, s = model.step(tokens[b, t:t + 1], s)
                assert torch.equal(step_logits[0], logits[b, t]), (b, t)


def test_adapter_auto_mode_and_exact_verification(monkeypatch):
    model = lstm_lm()
    adapter = RecurrentAdapter(model)
    assert (adapter.mode, adapter.exact) == ("unroll", True)
    assert RecurrentAdapter(lstm_lm("mamba2")).mode == "levels"
    assert RecurrentAdapter(model, mode="levels").mode == "levels"
    with pytest.raises(ValueError, match="'auto', 'levels' or 'unroll'"):
        RecurrentAdapter(model, mode="paths")
    tree = DraftTree([7, 3, 9, 4, 4, 1, 2, 8], [-1, 0, 0, 1, 1, 2, 5, 6])
    prompt = torch.randint(0, 41, (1, 12))
    want = []
    with torch.no_grad():
        _, s0 = model(prompt)
        for node in range(len(tree)):  # each node's logits by steps along its path
            s = s0
            for i in tree.path_to(node):
                step_logits, s = model.step(torch.tensor([tree.tokens[i]]), s)
            want.append(step_logits[0])
    want = torch.stack(want)
    for limit in (row_exact.EXACT_ROWS, 5):  # 5: the paths go in groups of one
        monkeypatch.setattr(adapter_module, "EXACT_ROWS", limit)
        for mode in ("unroll", "levels"):
            session = RecurrentAdapter(model, mode=mode).new_session()
            session.append(prompt)
            assert torch.equal(session.verify(tree), want), (mode, limit)
            session.commit([0, 1, 3])  # the committed state is exactly greedy's
            s = s0
            with torch.no_grad():
                for i in (0, 1, 3):
                    _, s = model.step(torch.tensor([tree.tokens[i]]), s)
            for got, ref in zip(session.state, s):
                assert all(torch.equal(a, c) for a, c in zip(got, ref)), (mode, limit)


def test_float32_speculative_decoding_equals_greedy():
    """End to end in float32 through generate's default adapter (auto: unroll, row-exact). The
    bitwise guarantee itself is the adapter test above (these prompts happen to decode the same
    with BLAS products too); this one fails if generate's default verifier stops agreeing
    with greedy."""
    assert RecurrentAdapter(lstm_lm()).mode == "unroll"
    model = lstm_lm()
    for seed in range(3):
        prompt = torch.randint(0, 41, (1, 15), generator=torch.Generator().manual_seed(seed))
        ref = generate(model, prompt, 40).tokens
        for spec in ("token_recycling", "prompt_lookup", "aded"):
            out = generate(model, prompt, 40, speculative=spec)
            assert torch.equal(out.tokens, ref), (seed, spec)
