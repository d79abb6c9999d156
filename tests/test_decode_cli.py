"""``recurra sample`` routed through recurra.decode: new flags, same output, stats on stderr."""

from __future__ import annotations

import pytest
from decode_models import single_thread  # noqa: F401

from recurra.cli import main


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from recurra.tasks.corpus import load_corpus

    tmp = tmp_path_factory.mktemp("decode_cli")
    text = tmp / "text.txt"
    text.write_bytes(load_corpus().train[:4000])
    out = tmp / "run"
    assert main(["train", "--d-model", "16", "--n-layers", "1", "--seq-len", "16",
                 "--batch-size", "4", "--steps", "2", "--eval-every", "2", "--data", str(text),
                 "--out", str(out), "--device", "cpu", "--no-progress",
                 "--sample-tokens", "0"]) == 0
    return out


def test_sample_speculative_and_beam_flags(checkpoint, capsys):
    capsys.readouterr()
    base = ["sample", str(checkpoint), "--prompt", "The the the ", "--max-new-tokens", "24",
            "--temperature", "0"]
    assert main(base) == 0
    greedy = capsys.readouterr()
    assert "tokens/s" in greedy.err and "mean accepted" in greedy.err
    for spec in ("prompt-lookup", "token-recycling", "aded"):
        assert main(base + ["--speculative", spec]) == 0
        out = capsys.readouterr()
        assert out.out == greedy.out, spec
        assert spec in out.err
    assert main(base + ["--strategy", "beam", "--num-beams", "3"]) == 0
    beam = capsys.readouterr()
    assert beam.out.startswith("The the the ") and "[beam]" in beam.err
    with pytest.raises(SystemExit):
        main(base + ["--speculative", "medusa"])
