"""torchrun data parallelism on CPU (gloo): 2 ranks x B streams == 1 process x 2B streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from recurra.train.checkpoint import load_model
from recurra.train.config import TrainConfig
from recurra.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def _losses(folder: Path) -> list[float]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def test_two_gloo_ranks_equal_one_process_with_both_ranks_streams(tmp_path):
    from recurra.tasks.corpus import load_corpus

    text = tmp_path / "text.txt"
    text.write_bytes(load_corpus().train[:3000])
    common = ["--d-model", "16", "--n-layers", "1", "--seq-len", "8", "--steps", "4",
              "--eval-every", "2", "--data", str(text), "--device", "cpu", "--no-progress",
              "--sample-tokens", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "recurra", "train", "--batch-size", "2", "--out", str(ddp), *common]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("validation:") == 1  # only rank 0 reports

    # the same run in one process, with both ranks' streams in one batch
    config = TrainConfig.from_dict(dict(
        json.loads((ddp / "config.json").read_text())["train"], batch_size=4,
        out=str(tmp_path / "single")))
    single = train(config, verbose=False)

    torch.testing.assert_close(torch.tensor(_losses(ddp)), torch.tensor(_losses(tmp_path / "single")),
                               rtol=1e-5, atol=1e-6)
    assert [s for s, _ in single.losses] == [1, 2, 3, 4]
    a, b = load_model(ddp).state_dict(), single.model.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # the checkpoint holds both ranks' carried states (for an exact resume under torchrun)
    state = torch.load(ddp / "training_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    h0, h1 = state["ranks"][0]["carried"][0][0], state["ranks"][1]["carried"][0][0]
    assert h0.shape == h1.shape == (1, 2, 16) and not torch.equal(h0, h1)


RESUME_SCRIPT = """
import json, sys
from recurra.train.config import TrainConfig
from recurra.train.trainer import train
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
stop = int(sys.argv[2]) or None
train(config, resume=sys.argv[3] == "resume", stop_after=stop, verbose=False)
"""


@pytest.mark.slow
def test_resume_under_torchrun_is_exact(tmp_path):
    """2 ranks: stop at step 3, resume to 6 == an uninterrupted 6-step run (per-rank carried
    states and RNG states come back from the checkpoint; dropout on)."""
    from recurra.tasks.corpus import load_corpus

    text = tmp_path / "text.txt"
    text.write_bytes(load_corpus().train[:3000])
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    model = {"architecture": "recurrent", "vocab_size": 256, "d_model": 16, "n_layers": 1,
             "layer": "lstm", "layer_options": {}, "mlp_ratio": 2, "dropout": 0.2,
             "tie_weights": True}

    def launch(out, stop, mode):
        config = TrainConfig(model=model, data=str(text), seq_len=8, batch_size=2, steps=6,
                             warmup_steps=1, eval_every=2, out=str(out), device="cpu").to_dict()
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(script), json.dumps(config), str(stop), mode]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240,
                              check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]

    launch(tmp_path / "full", 0, "fresh")
    launch(tmp_path / "cut", 3, "fresh")
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["step"] == 3
    launch(tmp_path / "cut", 0, "resume")
    full = (tmp_path / "full" / "metrics.jsonl").read_text()
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == full
    a, b = load_model(tmp_path / "full").state_dict(), load_model(tmp_path / "cut").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
