"""The default `recurra train` run (minutes): it must learn more than byte frequencies."""

from __future__ import annotations

import pytest
import torch

from recurra.train.config import TrainConfig
from recurra.train.trainer import train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_default_run_beats_the_unigram_baseline(tmp_path):
    result = train(TrainConfig(out=str(tmp_path / "run"), device="cpu"), verbose=False)
    assert result.step == 600 and len(result.evals) == 3
    assert result.unigram_bpb == pytest.approx(4.72, abs=0.01)
    # the unigram baseline is 4.72 bits per byte; the default LSTM reaches well below it
    assert result.evals[-1]["val_bpb"] < result.unigram_bpb - 1.0
    assert result.evals[-1]["val_bpb"] < result.evals[0]["val_bpb"]
