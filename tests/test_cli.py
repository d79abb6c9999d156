"""The train / sample / layers subcommands, end to end on a tiny model."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest
import torch

from recurra.cli import main
from recurra.commands.sample import pick_token, sample_tokens
from recurra.commands.train import layer_options, model_config, parse_value
from recurra.layers import describe
from recurra.train.checkpoint import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def text_file(tmp_path):
    from recurra.tasks.corpus import load_corpus

    path = tmp_path / "text.txt"
    path.write_bytes(load_corpus().train[:5000])
    return path


def tiny_args(text_file, out, *extra):
    return ["train", "--d-model", "16", "--n-layers", "1", "--seq-len", "16", "--batch-size", "4",
            "--eval-every", "2", "--data", str(text_file), "--out", str(out), "--device", "cpu",
            "--no-progress", "--sample-tokens", "20", *extra]


def test_train_sample_layers_smoke(tmp_path, text_file, capsys):
    out = tmp_path / "run"
    assert main(tiny_args(text_file, out, "--steps", "4")) == 0
    printed = capsys.readouterr().out
    assert "validation:" in printed and "unigram baseline" in printed and "sample: The " in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]

    # greedy sampling from the checkpoint == argmax decoding by hand
    assert main(["sample", str(out), "--prompt", "The c", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model = load_model(out)
    ids = list(b"The c")
    with torch.no_grad():
        for _ in range(8):
            logits, _ = model(torch.tensor([ids]))
            ids.append(int(logits[0, -1].argmax()))
    assert printed == bytes(ids).decode("utf-8", errors="replace")

    assert main(["layers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = describe()
    assert len(lines) == len(entries)
    for line, (name, description) in zip(lines, entries.items()):
        assert line.split()[0] == name and line.endswith(description)

    # --resume with more steps continues the run
    assert main(tiny_args(text_file, out, "--steps", "6", "--resume")) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(ValueError, match="d_model"):
        main(tiny_args(text_file, out, "--steps", "8", "--resume", "--d-model", "32"))
    capsys.readouterr()
    assert main(tiny_args(text_file, out, "--resume")) == 0  # the saved --steps 6: done
    assert "already at step 6 of 6; nothing to train" in capsys.readouterr().out


def test_bad_cli_input(tmp_path, text_file):
    with pytest.raises(ValueError, match="'no-such-layer'"):
        main(tiny_args(text_file, tmp_path / "a", "--steps", "1", "--layer", "no-such-layer"))
    with pytest.raises(ValueError, match="does not exist"):
        main(tiny_args(tmp_path / "missing.txt", tmp_path / "b", "--steps", "1"))
    with pytest.raises(ValueError, match="KEY=VALUE"):
        main(tiny_args(text_file, tmp_path / "c", "--steps", "1", "--layer-opt", "oops"))
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        main(["sample", str(tmp_path / "nothing")])
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        main(["train", "--resume", "--out", str(tmp_path / "nothing")])


def test_transformer_baseline_trains_and_samples(tmp_path, text_file, capsys):
    out = tmp_path / "tf"
    assert main(tiny_args(text_file, out, "--steps", "2", "--layer", "transformer",
                          "--layer-opt", "n_heads=2", "--sample-tokens", "0")) == 0
    config = json.loads((out / "config.json").read_text())["train"]["model"]
    assert config["architecture"] == "transformer" and config["n_heads"] == 2
    assert config["d_model"] == 16 and config["mlp_ratio"] == 2
    capsys.readouterr()
    assert main(["sample", str(out), "--prompt", "ab", "--max-new-tokens", "5",
                 "--temperature", "0"]) == 0
    model = load_model(out)
    ids = list(b"ab")
    with torch.no_grad():
        for _ in range(5):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    assert capsys.readouterr().out.rstrip("\n") == bytes(ids).decode("utf-8", errors="replace")


def test_cli_defaults_are_the_train_config_defaults():
    from recurra.cli import build_parser
    from recurra.commands.train import build_config
    from recurra.train.config import TrainConfig

    args = build_parser().parse_args(["train"])
    assert build_config(args) == TrainConfig(out="runs/default")


def test_layer_options_and_values():
    assert [parse_value(v) for v in ("3", "0.5", "true", "False", "tanh", "1e-3")] == \
        [3, 0.5, True, False, "tanh", 1e-3]
    args = Namespace(layer_opt=["num_heads=4", "backend=fused"], mode="sequential",
                     layer="paragru", d_model=64, n_layers=None, mlp_ratio=None, dropout=None)
    assert layer_options(args) == {"num_heads": 4, "backend": "fused", "mode": "sequential"}
    config = model_config(args, {"architecture": "recurrent", "vocab_size": 256, "d_model": 128,
                                 "n_layers": 2, "layer": "lstm", "layer_options": {}})
    assert config == {"architecture": "recurrent", "vocab_size": 256, "d_model": 64,
                      "n_layers": 2, "layer": "paragru",
                      "layer_options": {"num_heads": 4, "backend": "fused", "mode": "sequential"}}


def test_pick_token_filters():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([2.0, 1.5, 1.0, -1.0]).log_softmax(-1)
    assert pick_token(scores, 0.0, None, None, g) == 0
    assert {pick_token(scores, 1.0, 1, None, g) for _ in range(20)} == {0}
    probs = scores.softmax(-1)  # ~[0.53, 0.32, 0.19, 0.03]
    p = float(probs[0] + probs[1]) - 1e-4  # keeps exactly the two most likely
    seen = {pick_token(scores, 1.0, None, p, g) for _ in range(200)}
    assert seen == {0, 1}
    seen = {pick_token(scores, 1.0, 3, None, g) for _ in range(300)}
    assert seen == {0, 1, 2}
    # without filters, frequencies follow the softmax (a 4-sigma band)
    n = 4000
    counts = torch.bincount(torch.tensor([pick_token(scores, 1.0, None, None, g)
                                          for _ in range(n)]), minlength=4).double()
    sigma = (n * probs * (1 - probs)).sqrt()
    assert torch.all((counts - n * probs).abs() < 4 * sigma)


def test_sample_tokens_validates():
    model = torch.nn.Linear(1, 1)  # never called: validation comes first
    with pytest.raises(ValueError, match="prompt"):
        sample_tokens(model, [], 5)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(model, [1], 5, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(model, [1], 5, top_p=0)
