"""Prefix-causal language models (JRT-RNN): RecurrentLM over ``jrt`` with per-call prefixes, the
prefix masked-LM objective, and ``train(prefix_length=...)``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from recurra.models import RecurrentLM
from recurra.train.config import TrainConfig
from recurra.train.prefix_objective import mask_prefix, prefix_lm_loss
from recurra.train.trainer import train

V, P, T = 11, 5, 12


pytestmark = pytest.mark.usefixtures("one_thread")


def jrt_model(seed=0, **kw) -> RecurrentLM:
    torch.manual_seed(seed)
    options = {"vocab_size": V, "d_model": 16, "n_layers": 2, "layer": "jrt",
               "layer_options": {"heads": 2, "key_dim": 4, "chunk_size": 4, "prefix_length": P},
               "mlp_ratio": 2}
    options.update(kw)
    return RecurrentLM(**options)


def tokens(batch=3, steps=T, seed=1):
    return torch.randint(0, V - 1, (batch, steps), generator=torch.Generator().manual_seed(seed))


def test_model_accepts_prefix_layers_and_only_they_take_prefix_lengths():
    model = jrt_model()
    assert model.reads_prefix
    lstm = RecurrentLM(V, 8, 1, layer="lstm")
    assert not lstm.reads_prefix
    with pytest.raises(ValueError, match="no layer of this model reads a prefix"):
        lstm(tokens(), prefix_lengths=2)
    with pytest.raises(ValueError, match=r"prefix_lengths must lie in \[0, 12\]"):
        model(tokens(), prefix_lengths=13)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        model(tokens(), prefix_lengths=[1, 2])
    # without prefix_lengths every layer uses its own prefix_length (P)
    x = tokens()
    torch.testing.assert_close(model(x)[0], model(x, prefix_lengths=P)[0])


def test_suffix_logits_ignore_future_tokens_and_prefix_logits_read_the_whole_prefix():
    model = jrt_model().double().eval()
    x = tokens()
    prefix = torch.tensor([P, 3, 7])
    base = model(x, prefix_lengths=prefix)[0]
    for j in range(T):
        x2 = x.clone()
        x2[:, j] = (x2[:, j] + 1) % (V - 1)
        moved = (model(x2, prefix_lengths=prefix)[0] - base).abs().amax(-1)   # (B, T)
        for b in range(3):
            m = int(prefix[b])
            unaffected = [t for t in range(T) if t < j and (j >= m or t >= m)]
            if unaffected:  # (exact up to float64 rounding of the chunked sums)
                assert moved[b, unaffected].max() < 1e-12, (b, j)
            # every position from j on moves, and, inside the prefix, so does every earlier one
            affected = list(range(j, T)) + (list(range(j)) if j < m else [])
            assert moved[b, affected].min() > 1e-6, (b, j)


def test_step_after_the_prefix_equals_the_parallel_pass():
    model = jrt_model().double().eval()
    x = tokens()
    full, final = model(x, prefix_lengths=P)
    logits, state = model(x[:, :P], prefix_lengths=P)
    torch.testing.assert_close(logits, full[:, :P], atol=1e-10, rtol=1e-9)
    for t in range(P, T):
        step_logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(step_logits, full[:, t], atol=1e-10, rtol=1e-9)
    # chunks after the prefix continue exactly too
    _, st = model(x[:, :P + 2], prefix_lengths=P)
    rest, st = model(x[:, P + 2:], st)
    torch.testing.assert_close(rest, full[:, P + 2:], atol=1e-10, rtol=1e-9)
    for a, b in zip(st, final):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-9)
    with pytest.raises(ValueError, match="prefill"):
        model.step(x[:, 0], None)
    _, whole = model(x[:, :P - 1], prefix_lengths=P - 1)  # the call read its whole prefix
    model.step(x[:, 0], whole)
    _, short = model(x[:, :2])  # default prefix P, only 2 tokens read: stopped inside it
    with pytest.raises(ValueError, match="inside their prefix"):
        model.step(x[:, 0], short)


def test_objective_equals_an_independent_loop():
    model = jrt_model().double()
    x, y = tokens(seed=2), tokens(seed=3)
    prefix = torch.tensor([P, 2, 8])
    mask_id = V - 1
    loss = prefix_lm_loss(model, x, y, prefix, mask_id, mlm_weight=0.25, mask_prob=0.4,
                          generator=torch.Generator().manual_seed(7))
    corrupted, masked = mask_prefix(x, prefix, mask_id, 0.4, torch.Generator().manual_seed(7))
    assert masked.any()
    logp = torch.log_softmax(model(corrupted, prefix_lengths=prefix)[0], -1)
    mlm_terms, ntp_terms = [], []
    for b in range(3):
        for t in range(T):
            if t < prefix[b]:
                assert bool(masked[b, t]) == (corrupted[b, t] == mask_id and x[b, t] != mask_id)
                if masked[b, t]:
                    mlm_terms.append(-logp[b, t, x[b, t]])
            else:
                assert not masked[b, t] and corrupted[b, t] == x[b, t]
                ntp_terms.append(-logp[b, t, y[b, t]])
    mlm, ntp = sum(mlm_terms) / len(mlm_terms), sum(ntp_terms) / len(ntp_terms)
    assert loss.masked_count == len(mlm_terms) and loss.suffix_count == len(ntp_terms) == 3 * T - 15
    torch.testing.assert_close(loss.masked_lm, mlm)
    torch.testing.assert_close(loss.next_token, ntp)
    torch.testing.assert_close(loss.total, ntp + 0.25 * mlm)
    # the mask rate is the asked one (many draws)
    _, many = mask_prefix(torch.zeros(400, 50, dtype=torch.long), 50, 1, 0.15,
                          torch.Generator().manual_seed(0))
    assert abs(many.float().mean().item() - 0.15) < 0.01
    with pytest.raises(ValueError, match="needs a suffix"):
        prefix_lm_loss(model, x, y, T, mask_id)


def test_a_few_training_steps_reduce_the_loss():
    # learnable data: each token is the previous one plus 3 (mod 10), random starts; masked prefix
    # tokens are predictable from their neighbours on both sides
    model = jrt_model(seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    seq = (torch.randint(0, 10, (16, 1), generator=torch.Generator().manual_seed(0))
           + 3 * torch.arange(T + 1)) % 10
    x, y = seq[:, :-1], seq[:, 1:]
    losses = []
    for i in range(30):
        loss = prefix_lm_loss(model, x, y, P, V - 1, mask_prob=0.3,
                              generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append((loss.total.item(), loss.next_token.item(), loss.masked_lm.item()))
    assert losses[0][1] > 0.9 * math.log(V)  # starts near chance
    first = [sum(r[k] for r in losses[:3]) / 3 for k in range(3)]
    last = [sum(r[k] for r in losses[-3:]) / 3 for k in range(3)]
    assert last[0] < 0.5 * first[0], losses          # the total
    assert last[1] < 0.5 * first[1] and last[2] < 0.5 * first[2], losses  # and both parts


def _tiny_config(tmp_path, **kw) -> TrainConfig:
    from recurra.tasks.corpus import load_corpus

    text = tmp_path / "text.txt"
    text.write_bytes(load_corpus().train[:6000])
    model = {"architecture": "recurrent", "vocab_size": 256, "d_model": 16, "n_layers": 1,
             "layer": "jrt", "layer_options": {"heads": 2, "key_dim": 4, "prefix_length": 8},
             "mlp_ratio": 2, "dropout": 0.0, "tie_weights": True}
    options = {"model": model, "data": str(text), "seq_len": 24, "batch_size": 8, "steps": 12,
               "warmup_steps": 1, "eval_every": 6, "eval_batch_size": 4,
               "out": str(tmp_path / "run"), "device": "cpu", "lr": 2e-2, "prefix_length": 8}
    options.update(kw)
    return TrainConfig(**options)


def test_trainer_trains_with_the_prefix_objective_and_resumes_exactly(tmp_path):
    config = _tiny_config(tmp_path)
    full = train(config, verbose=False)
    losses = [loss for _, loss in full.losses]
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all("next_token_loss" in r and "masked_lm_loss" in r for r in steps)
    for r in steps:
        assert math.isclose(r["loss"], r["next_token_loss"] + 0.25 * r["masked_lm_loss"],
                            rel_tol=1e-5)
    assert [e["step"] for e in full.evals] == [6, 12]
    cut = _tiny_config(tmp_path, out=str(tmp_path / "cut"))
    first = train(cut, stop_after=4, verbose=False)
    second = train(cut, resume=True, verbose=False)
    assert first.losses + second.losses == full.losses


def test_trainer_prefix_mode_bad_input(tmp_path):
    with pytest.raises(ValueError, match="prefix_length must be an int in"):
        _tiny_config(tmp_path, prefix_length=24)
    lstm = {"architecture": "recurrent", "vocab_size": 256, "d_model": 8, "n_layers": 1,
            "layer": "lstm"}
    with pytest.raises(ValueError, match="needs a model whose layers read a prefix"):
        train(_tiny_config(tmp_path, model=lstm), verbose=False)
    # a prefix layer in plain (stateful next-token) training: only with prefix_length 0
    with pytest.raises(ValueError, match="read a prefix of \\[8\\] tokens"):
        train(_tiny_config(tmp_path, prefix_length=0), verbose=False)
    causal = _tiny_config(tmp_path, prefix_length=0, steps=2, eval_every=2)
    causal.model["layer_options"]["prefix_length"] = 0
    assert len(train(causal, verbose=False).losses) == 2


def test_cli_trains_a_jrt_model_with_a_prefix_and_samples_after_it(tmp_path, capsys):
    from recurra.cli import main
    from recurra.tasks.corpus import load_corpus
    from recurra.train.checkpoint import read_config

    text = tmp_path / "text.txt"
    text.write_bytes(load_corpus().train[:5000])
    out = tmp_path / "run"
    assert main(["train", "--layer", "jrt", "--layer-opt", "heads=2", "--layer-opt", "key_dim=4",
                 "--d-model", "16", "--n-layers", "1", "--seq-len", "24", "--batch-size", "4",
                 "--steps", "3", "--eval-every", "3", "--prefix-length", "8", "--data",
                 str(text), "--out", str(out), "--device", "cpu", "--no-progress",
                 "--sample-tokens", "5"]) == 0
    printed = capsys.readouterr().out
    assert "validation:" in printed and "sample: " in printed
    saved = read_config(out)["train"]
    assert saved["prefix_length"] == 8 and saved["mlm_weight"] == 0.25
    # the layer's default prefix follows --prefix-length, so plain calls read the same prefix
    assert saved["model"]["layer_options"] == {"heads": 2, "key_dim": 4, "prefix_length": 8}


def test_evaluate_prefix_loss_scores_the_suffix_of_each_window():
    from recurra.train.evaluate import evaluate_prefix_loss

    model = jrt_model(vocab_size=256).double()
    data = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0))
    got = evaluate_prefix_loss(model, data, n_streams=2, seq_len=10, prefix_length=4,
                               device=torch.device("cpu"))
    # by hand: 2 streams of 35 bytes; windows [0,10), [10,20), [20,30), [30,34): the last has
    # no suffix position beyond its 4-byte prefix, so it is skipped
    terms = []
    for s in range(2):
        stream = data[35 * s:35 * (s + 1)]
        for lo in (0, 10, 20):
            x, y = stream[lo:lo + 10], stream[lo + 1:lo + 11]
            logp = torch.log_softmax(model(x[None], prefix_lengths=4)[0][0], -1)
            terms += [-logp[t, y[t]].item() for t in range(4, 10)]
    assert math.isclose(got, sum(terms) / len(terms), rel_tol=1e-9)
