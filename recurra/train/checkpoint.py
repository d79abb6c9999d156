"""Checkpoints: a folder of three files, each written atomically (tmp file + ``os.replace``).

- ``config.json``: ``{"format": ..., "step": N, "train": TrainConfig dict (its "model" entry is
  the model config for recurra.models.build_model)}``;
- ``model.safetensors``: the weights (tied tensors stored once), metadata ``step``;
- ``training_state.pt``: optimizer and scheduler state, and per rank the random-number state and
  the recurrent state carried between batches; ``step`` again.

The training state is written last; a resume checks that all three files agree on ``step``.
``load_model(path)`` needs only the first two.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

FORMAT = "recurra-checkpoint-1"
CONFIG, WEIGHTS, TRAINING_STATE = "config.json", "model.safetensors", "training_state.pt"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(folder: str | os.PathLike, model: torch.nn.Module, train_config: dict,
                    step: int, training_state: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "step": step, "train": train_config}
    _atomic_write(folder / CONFIG,
                  lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
    _atomic_write(folder / WEIGHTS,
                  lambda p: save_model(model, str(p), metadata={"step": str(step)}))
    if training_state is not None:
        state = {"step": step, **training_state}
        _atomic_write(folder / TRAINING_STATE, lambda p: torch.save(state, p))
    return folder


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The checkpoint folder for a folder or a path to its model.safetensors / config.json."""
    path = Path(path)
    if path.is_file() and path.name in (CONFIG, WEIGHTS):
        path = path.parent
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(
            f"checkpoint path {str(path)!r} is not a checkpoint folder (it needs {CONFIG} and "
            f"{WEIGHTS}, as written by `recurra train --out`)"
        )
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    config = json.loads((checkpoint_folder(path) / CONFIG).read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"checkpoint {str(path)!r} has format {config.get('format')!r}, "
                         f"expected {FORMAT!r}")
    return config


def load_weights(model: torch.nn.Module, path: str | os.PathLike, device="cpu") -> int:
    """Load the weights into ``model`` (strict); returns the checkpoint's step."""
    from safetensors import safe_open
    from safetensors.torch import load_model as load_safetensors

    file = checkpoint_folder(path) / WEIGHTS
    load_safetensors(model, str(file), strict=True, device=str(device))
    with safe_open(str(file), "pt") as f:
        return int(f.metadata()["step"])


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a trained model from a checkpoint folder (in eval mode, on ``device``)."""
    from ..models import build_model

    config = read_config(path)
    model = build_model(config["train"]["model"]).to(device)
    load_weights(model, path, device)
    return model.eval()


def load_training_state(path: str | os.PathLike, step: int) -> dict[str, Any]:
    file = checkpoint_folder(path) / TRAINING_STATE
    if not file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no {TRAINING_STATE}; cannot resume")
    state = torch.load(file, map_location="cpu", weights_only=True)
    if state["step"] != step:
        raise ValueError(
            f"checkpoint {str(path)!r} is inconsistent: weights at step {step}, training state at "
            f"step {state['step']} (a write was interrupted); cannot resume exactly"
        )
    return state
