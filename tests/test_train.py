"""Training: schedule, streams, evaluation, checkpoints and exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from recurra.models import RecurrentLM
from recurra.train.checkpoint import load_model, load_training_state, read_config
from recurra.train.config import TrainConfig
from recurra.train.evaluate import evaluate_loss, stream_targets, unigram_bits_per_byte
from recurra.train.schedule import make_scheduler, warmup_cosine
from recurra.train.streams import TokenStreams
from recurra.train.trainer import train


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tmp_path, **kw) -> TrainConfig:
    text = tmp_path / "text.txt"
    if not text.exists():
        from recurra.tasks.corpus import load_corpus

        text.write_bytes(load_corpus().train[:6000])
    model = {"architecture": "recurrent", "vocab_size": 256, "d_model": 24, "n_layers": 2,
             "layer": "lstm", "layer_options": {}, "mlp_ratio": 2, "dropout": 0.1,
             "tie_weights": True}
    options = dict(model=model, data=str(text), seq_len=16, batch_size=4, steps=10,
                   warmup_steps=2, eval_every=3, eval_batch_size=4, out=str(tmp_path / "run"),
                   device="cpu", lr=1e-2)
    options.update(kw)
    return TrainConfig(**options)


# ------------------------------------------------------------------- schedule
def test_warmup_cosine_closed_form():
    w, n, r = 4, 24, 0.1
    assert warmup_cosine(0, w, n, r) == pytest.approx(0.25)
    assert warmup_cosine(3, w, n, r) == pytest.approx(1.0)
    assert warmup_cosine(4, w, n, r) == pytest.approx(1.0)  # cosine starts at its peak
    mid = 4 + (n - 1 - 4) / 2
    assert warmup_cosine(mid, w, n, r) == pytest.approx((1 + r) / 2)
    assert warmup_cosine(n - 1, w, n, r) == pytest.approx(r)
    assert warmup_cosine(n + 10, w, n, r) == pytest.approx(r)
    step = 10
    expected = r + (1 - r) * 0.5 * (1 + math.cos(math.pi * (step - w) / (n - 1 - w)))
    assert warmup_cosine(step, w, n, r) == pytest.approx(expected)
    # the scheduler applies it to the optimizer's lr, step by step
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = make_scheduler(opt, w, n, r)
    seen = []
    for _ in range(n):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * warmup_cosine(s, w, n, r) for s in range(n)])


# ------------------------------------------------------------------- streams
def test_streams_are_contiguous_and_split_across_ranks():
    data = torch.arange(103, dtype=torch.long)
    streams = TokenStreams(data, n_streams=4, seq_len=5)  # 25 tokens each, 4 batches an epoch
    assert streams.batches_per_epoch == 4
    xs, ys = [], []
    for k in range(4):
        x, y, new_epoch = streams.batch(k)
        assert new_epoch == (k == 0)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs, 1), torch.cat(ys, 1)
    for i in range(4):
        assert torch.equal(x[i], torch.arange(25 * i, 25 * i + 20))
        assert torch.equal(y[i], torch.arange(25 * i + 1, 25 * i + 21))
    assert torch.equal(streams.batch(4)[0], streams.batch(0)[0]) and streams.batch(4)[2]
    # two ranks with two streams each read exactly the rows of the four-stream batches
    for rank in range(2):
        part = TokenStreams(data, n_streams=4, seq_len=5, first=2 * rank, count=2)
        for k in range(5):
            assert torch.equal(part.batch(k)[0], streams.batch(k)[0][2 * rank:2 * rank + 2])
    with pytest.raises(ValueError, match="too short"):
        TokenStreams(data, n_streams=20, seq_len=5)


# ------------------------------------------------------------------- evaluation
def test_unigram_bits_per_byte_by_hand():
    train_bytes = torch.tensor([97, 97, 98], dtype=torch.uint8)  # counts a:2, b:1, +1 smoothing
    targets = torch.tensor([97, 98, 99])
    total = 3 + 256
    expected = -(math.log2(3 / total) + math.log2(2 / total) + math.log2(1 / total)) / 3
    assert unigram_bits_per_byte(train_bytes, targets) == pytest.approx(expected, rel=1e-12)


def test_evaluate_loss_carries_state_across_windows():
    torch.manual_seed(0)
    model = RecurrentLM(256, 16, 1, layer="lstm").double()
    tokens = torch.randint(0, 256, (83,), dtype=torch.uint8)
    got = evaluate_loss(model, tokens, n_streams=3, seq_len=7, device=torch.device("cpu"))
    streams = tokens[:81].view(3, 27).long()
    logits, _ = model(streams[:, :-1])  # one pass over whole streams
    expected = F.cross_entropy(logits.reshape(-1, 256), streams[:, 1:].reshape(-1)).item()
    assert got == pytest.approx(expected, rel=1e-10)
    assert stream_targets(tokens, 3).shape == (3, 26)


# ------------------------------------------------------------------- training, checkpoints, resume
def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path):
    # 6000 bytes -> 5700 train bytes / 4 streams / 16 = 89 batches an epoch: use a shorter text so
    # the run crosses an epoch boundary (state reset) after resuming
    short = tmp_path / "short.txt"
    from recurra.tasks.corpus import load_corpus

    short.write_bytes(load_corpus().train[:420])  # 399 train bytes -> 99 per stream -> 6 batches
    full = train(tiny_config(tmp_path, data=str(short), out=str(tmp_path / "full")), verbose=False)
    assert len(full.losses) == 10 and [e["step"] for e in full.evals] == [3, 6, 9, 10]

    config = tiny_config(tmp_path, data=str(short), out=str(tmp_path / "cut"))
    first = train(config, stop_after=5, verbose=False)  # stops between checkpoints: saves at 5
    assert first.step == 5 and read_config(config.out)["step"] == 5
    second = train(config, resume=True, verbose=False)
    assert second.step == 10
    assert first.losses + second.losses == full.losses  # exact float equality
    assert first.evals + second.evals == full.evals
    for (name, a), (_, b) in zip(full.model.state_dict().items(),
                                 second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert _rows(tmp_path / "cut" / "metrics.jsonl") == _rows(tmp_path / "full" / "metrics.jsonl")
    assert full.losses[-1][1] < full.losses[0][1]


def test_resume_drops_log_rows_after_the_checkpoint_and_checks_config(tmp_path):
    config = tiny_config(tmp_path, steps=4, eval_every=2)
    train(config, verbose=False)
    log = tmp_path / "run" / "metrics.jsonl"
    log.write_text(log.read_text() + json.dumps({"step": 99, "loss": 0.0}) + "\n")
    # a later run with more steps resumes from step 4 and rewrites the log from there
    longer = tiny_config(tmp_path, steps=6, eval_every=2)
    result = train(longer, resume=True, verbose=False)
    assert [s for s, _ in result.losses] == [5, 6]
    assert [r["step"] for r in _rows(log)] == [1, 2, 2, 3, 4, 4, 5, 6, 6]
    with pytest.raises(ValueError, match="batch_size is 8 but the checkpoint was trained with 4"):
        train(tiny_config(tmp_path, steps=8, batch_size=8), resume=True, verbose=False)
    state = torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)
    assert state["data"]["epoch"] == 0 and state["data"]["batch_in_epoch"] == 6
    text = tmp_path / "text.txt"
    text.write_bytes(text.read_bytes().replace(b"e", b"E"))
    with pytest.raises(ValueError, match="has changed since the checkpoint"):
        train(tiny_config(tmp_path, steps=8), resume=True, verbose=False)


def test_checkpoint_round_trip_and_consistency_check(tmp_path):
    config = tiny_config(tmp_path, steps=3, eval_every=3)
    result = train(config, verbose=False)
    saved = read_config(config.out)
    assert saved["step"] == 3 and saved["train"]["model"] == config.model
    assert TrainConfig.from_dict(saved["train"]) == config
    loaded = load_model(config.out)
    assert isinstance(loaded, RecurrentLM) and not loaded.training
    x = torch.randint(0, 256, (2, 9))
    result.model.eval()
    assert torch.equal(loaded(x)[0], result.model(x)[0])
    assert loaded.head.weight is loaded.embedding.weight  # tying survives the round trip
    # a training state from another step (an interrupted write) is refused
    state_file = tmp_path / "run" / "training_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["step"] = 2
    torch.save(state, state_file)
    with pytest.raises(ValueError, match="inconsistent"):
        load_training_state(config.out, 3)
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        load_model(tmp_path / "nowhere")


def test_bad_training_input(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train(tiny_config(tmp_path, data=str(tmp_path / "missing.txt")), verbose=False)
    with pytest.raises(ValueError, match="unknown layer name 'nope'"):
        model = dict(tiny_config(tmp_path).model, layer="nope")
        train(tiny_config(tmp_path, model=model), verbose=False)
    with pytest.raises(ValueError, match="seq_len"):
        tiny_config(tmp_path, seq_len=0)
    with pytest.raises(ValueError, match="vocab_size must be 256"):
        model = dict(tiny_config(tmp_path).model, vocab_size=100)
        train(tiny_config(tmp_path, model=model), verbose=False)
    with pytest.raises(ValueError, match="no training_state|not a checkpoint"):
        train(tiny_config(tmp_path, out=str(tmp_path / "fresh")), resume=True, verbose=False)
