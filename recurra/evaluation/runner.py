"""Run a grid of cells: resumable, and one failing cell never loses the others.

Trained weights are kept under ``OUT/models/`` so cells that differ only in test-time options
train once. Each finished cell is written at once to ``OUT/cells/<cell id>.json`` (atomically) together with
the hash of its configuration. A later run with the same output folder skips every cell whose file
holds ``status: ok`` for the same configuration, and recomputes failed, missing or changed ones;
``resume=False`` recomputes every cell and also deletes the trained weights of earlier runs.
A cell that raises (an unknown or broken layer, a NaN loss, ...) is recorded as
``status: failed`` with the error, and the run goes on. After the grid, the report (JSON,
markdown, PNG plots) is rebuilt from all cell files of the grid.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from .specs import Budget, CellSpec, config_hash

TrainFn = Callable[..., dict[str, Any]]


def cell_path(out_dir: str, cell: CellSpec) -> str:
    return os.path.join(out_dir, "cells", cell.cell_id() + ".json")


def load_cell(out_dir: str, cell: CellSpec) -> dict[str, Any] | None:
    path = cell_path(out_dir, cell)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None  # a damaged file is recomputed


def write_json(path: str, data: Any) -> None:
    """Write JSON atomically (a crash never leaves half a file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


def run_cells(cells: Sequence[CellSpec], budget: Budget, out_dir: str, resume: bool = True,
              progress: bool = True, train_fn: TrainFn | None = None,
              log: Callable[[str], None] | None = None,
              on_cell: Callable[[list[dict[str, Any]]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Run (or reuse) every cell; returns one result dict per cell, in order.

    ``on_cell(results so far)`` is called after every computed cell (e.g. to refresh a report).
    """
    if train_fn is None:
        from .training import train_and_test as train_fn
    ids = [c.cell_id() for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("cells must be distinct (same task, model spec and training length given twice)")
    if not resume:  # recompute everything: trained weights of earlier runs are not reused either
        shutil.rmtree(os.path.join(out_dir, "models"), ignore_errors=True)
    results: list[dict[str, Any]] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cells), desc="eval", unit="cell", dynamic_ncols=True)
    try:
        for cell in cells:
            config = cell.config(budget)
            digest = config_hash(config)
            previous = load_cell(out_dir, cell) if resume else None
            if previous and previous.get("status") == "ok" and previous.get("config_hash") == digest:
                results.append(dict(previous, resumed=True))
                if bar is not None:
                    bar.update(1)
                continue
            label = f"{cell.task} | {cell.model}"
            if bar is not None:
                bar.set_postfix_str(label)

            def on_step(step: int, loss: float, _label=label) -> None:
                if bar is not None and step % 25 == 0:
                    bar.set_postfix_str(f"{_label} step {step} loss {loss:.3f}")

            start = time.perf_counter()
            try:
                result = train_fn(cell, cell.budget(budget), on_step=on_step,
                                  cache_dir=os.path.join(out_dir, "models"))
            except Exception as e:  # noqa: BLE001 - a failing cell must not stop the grid
                result = {
                    "status": "failed",
                    "task": cell.task,
                    "model": cell.model,
                    "train_length": cell.train_length,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(limit=6),
                }
                if log is not None:
                    log(f"cell {label} failed: {type(e).__name__}: {e}")
            result["seconds"] = round(time.perf_counter() - start, 2)
            result["config"] = config
            result["config_hash"] = digest
            result["cell_id"] = cell.cell_id()
            write_json(cell_path(out_dir, cell), result)
            results.append(result)
            if on_cell is not None:
                on_cell(results)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results
