"""`recurra bench zoo` / `zoo_b` smoke runs (--quick, one cheap layer each): tables, JSON, charts."""

import json

import pytest
import torch

from recurra.bench.zoo import held_lock, step_loop
from recurra.cli import main
from recurra.layers import build


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("suite, only", [("zoo", "aaren"), ("zoo_b", "fsmn (order 20)")])
def test_quick_run_writes_table_json_png_and_holds_the_lock(tmp_path, suite, only):
    out = tmp_path / suite
    lock = tmp_path / "bench.lock"
    args = ["bench", suite, "--quick", "--threads", "1", "--only", only, "--lock", str(lock),
            "--out", str(out)]
    assert main(args + (["--skip-fla"] if suite == "zoo" else [])) == 0
    data = json.loads((tmp_path / f"{suite}.json").read_text())
    assert [r[2] for r in data["rows"]] == ["fwd", "fwd+bwd"]
    assert all(r[3] > 0 and r[4] > 0 for r in data["rows"])
    assert len(data["memory"]) == 1
    md = (tmp_path / f"{suite}.md").read_text()
    assert f"--lock '{lock}'" in md and "Timed holding" in md and "Step-mode memory" in md
    assert (tmp_path / f"{suite}.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpointed_step_loop_gives_the_plain_loops_gradients():
    torch.manual_seed(0)
    layer = build("linear_attention", 8, heads=2).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    grads = []
    for every in (0, 3):
        layer.zero_grad()
        y = step_loop(layer, x, True, checkpoint_every=every)()
        grads.append([p.grad.clone() for p in layer.parameters()] + [y.detach()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_held_lock_excludes_another_holder(tmp_path):
    import fcntl

    path = tmp_path / "lock"
    with held_lock(str(path)), open(path) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path) as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
