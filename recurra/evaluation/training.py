"""One cell: build a small model, train it on a task (supervised, masked), test it per length.

The loss is cross-entropy at the answer positions of each batch (``batch.mask``); the model is
any ``recurra.models`` language model (``logits = model(tokens)[0]``, one class per vocabulary
token). Training stops early once the loss has stayed near zero (``Budget.early_stop_loss``) and, as
a safety net on a loaded machine, after ``Budget.max_train_seconds`` (the cell is then marked
``time_capped`` and is no longer exactly reproducible). Otherwise it is deterministic given the
cell's seed: parameters are initialised under
``torch.manual_seed``, batch b is ``task.sample(batch_size, L_b, seed=seed * 1_000_003 + b)``
with L_b drawn from ``task.train_lengths(train_length)`` by a seeded generator (for the first
``Budget.warm_start_steps`` steps from ``task.train_lengths(Budget.warm_start_length)``: continual
training from a shorter length, with early stopping only after that phase), and the test set
of each length is ``task.sample(n_test, L, seed=seed, split="test")``.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .metrics import Counts
from .prefix_lm import set_prefix_length
from .specs import Budget, CellSpec, ModelSpec, config_hash, parse_model_spec, split_test_options

EVAL_BATCH = 64


def build_cell_model(model: ModelSpec, vocab_size: int, budget: Budget,
                     test_time: bool = False, tie_weights: bool = True) -> torch.nn.Module:
    """The language model of a cell (``test_time`` adds the spec's test-only layer options).

    ``tie_weights`` (the task's, see ``SequenceTask.tie_weights``) ties the output head to the
    embedding unless the model spec sets ``tie_weights`` itself.
    """
    from ..models import build_model

    options = {"d_model": budget.d_model, "n_layers": budget.n_layers,
               "tie_weights": tie_weights, **model.model_options}
    if model.architecture == "transformer":
        d = options["d_model"]
        options.setdefault("n_heads", max(1, d // 16) if (d // max(1, d // 16)) % 2 == 0 else 1)
        return build_model({"architecture": "transformer", "vocab_size": vocab_size, **options})
    layer_options = dict(model.layer_options)
    if test_time:
        layer_options.update(model.test_layer_options)
    if not layer_is_causal(model.layer, options["d_model"], layer_options):
        from .prefix_lm import PrefixLM

        return PrefixLM(vocab_size, layer=model.layer, layer_options=layer_options, **options)
    return build_model({"architecture": "recurrent", "vocab_size": vocab_size,
                        "layer": model.layer, "layer_options": layer_options, **options})


def layer_is_causal(name: str, d_model: int, layer_options: dict) -> bool:
    """Whether the registered layer ``name`` is causal (an unknown name raises ValueError)."""
    from ..layers import build

    return bool(build(name, d_model, **layer_options).causal)


def lr_at(step: int, budget: Budget) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < budget.warmup:
        return budget.lr * (step + 1) / budget.warmup
    progress = (step - budget.warmup) / max(1, budget.steps - budget.warmup)
    return budget.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train_model(cell: CellSpec, budget: Budget,
                on_step: Callable[[int, float], None] | None = None):
    """Train the cell's model on the training part of its task spec.

    Returns ``(model, record)``; ``record`` is the JSON-ready training summary.
    """
    from ..tasks.registry import build_task

    task = build_task(split_test_options(cell.task)[0])
    spec = parse_model_spec(cell.model)
    task.check_length(cell.train_length)
    torch.manual_seed(cell.seed)
    model = build_cell_model(spec, task.vocab_size, budget, tie_weights=task.tie_weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr, weight_decay=0.01)
    lengths = task.train_lengths(cell.train_length)
    if budget.warm_start_steps:  # continual training: first at the short length, then at ours
        task.check_length(budget.warm_start_length)
        short_lengths = task.train_lengths(budget.warm_start_length)
    length_rng = np.random.default_rng(cell.seed)
    losses: list[float] = []
    start = time.perf_counter()
    time_capped = False
    model.train()
    for step in range(budget.steps):
        if budget.max_train_seconds and time.perf_counter() - start > budget.max_train_seconds:
            time_capped = True
            break
        phase = short_lengths if step < budget.warm_start_steps else lengths
        length = int(phase[length_rng.integers(len(phase))])
        batch = task.sample(budget.batch_size, length, seed=cell.seed * 1_000_003 + step)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, budget)
        set_prefix_length(model, batch.mask)
        logits = model(batch.inputs)[0]
        loss = F.cross_entropy(logits[batch.mask], batch.targets[batch.mask])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1])
        if (budget.early_stop_loss and len(losses) >= budget.warm_start_steps + budget.patience
                and float(np.mean(losses[-budget.patience:])) < budget.early_stop_loss):
            break
    record = {
        "n_params": sum(p.numel() for p in model.parameters()),
        "steps_done": len(losses),
        "time_capped": time_capped,
        "train_seconds": round(time.perf_counter() - start, 2),
        "final_loss": float(np.mean(losses[-10:])) if losses else None,
        "loss_curve": [round(x, 4) for x in losses[:: max(1, len(losses) // 50)]],
    }
    return model, record


def training_key(cell: CellSpec, budget: Budget) -> str:
    """Identity of a training run: cells that differ only in test-time options share it."""
    return config_hash({"task": split_test_options(cell.task)[0],
                        "model": cell.model.partition("@")[0],
                        "train_length": cell.train_length, "seed": cell.seed,
                        "budget": asdict(budget)})


def train_and_test(cell: CellSpec, budget: Budget,
                   on_step: Callable[[int, float], None] | None = None,
                   cache_dir: str | None = None) -> dict[str, Any]:
    """Train (or load the cached weights of) the cell's model and test it at every length.

    With ``cache_dir``, trained weights are kept as ``cache_dir/<training key>.pt`` so cells
    that differ only in test-time options (after ``@``) train once. Raises on failure.
    """
    from ..tasks.registry import build_task

    test_task = build_task(cell.task.replace("@", ":", 1) if "@" in cell.task else cell.task)
    spec = parse_model_spec(cell.model)
    for length in cell.test_lengths:
        test_task.check_length(length)
    key = training_key(cell, budget)
    path = os.path.join(cache_dir, key + ".pt") if cache_dir else None
    if path and os.path.exists(path):
        saved = torch.load(path, weights_only=False)
        model = build_cell_model(spec, test_task.vocab_size, budget,
                                 tie_weights=test_task.tie_weights)
        model.load_state_dict(saved["state_dict"])
        record = dict(saved["record"], reused_training=key)
    else:
        model, record = train_model(cell, budget, on_step)
        if path:
            os.makedirs(cache_dir, exist_ok=True)
            torch.save({"state_dict": model.state_dict(), "record": record}, path + ".tmp")
            os.replace(path + ".tmp", path)
    if spec.test_layer_options:
        test_model = build_cell_model(spec, test_task.vocab_size, budget, test_time=True,
                                      tie_weights=test_task.tie_weights)
        test_model.load_state_dict(model.state_dict())
    else:
        test_model = model
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = {str(n): test_at_length(test_model, test_task, n, budget.n_test, cell.seed)
                   for n in cell.test_lengths}
    return {
        "status": "ok",
        "task": cell.task,
        "task_name": test_task.name,
        "model": cell.model,
        "primary_metric": test_task.primary_metric,
        "train_length": cell.train_length,
        **record,
        "test_seconds": round(time.perf_counter() - start, 2),
        "test_warnings": sorted({str(w.message) for w in caught})[:5],
        "accuracy": results,
    }


@torch.no_grad()
def test_at_length(model: torch.nn.Module, task, length: int, n_test: int,
                   seed: int) -> dict[str, float]:
    """Token, sequence and last-answer accuracy of ``model`` on the test split at ``length``."""
    model.eval()
    batch = task.sample(n_test, length, seed=seed, split="test")
    counts = Counts()
    for i in range(0, n_test, EVAL_BATCH):
        inputs = batch.inputs[i:i + EVAL_BATCH]
        set_prefix_length(model, batch.mask[i:i + EVAL_BATCH])
        logits = model(inputs)[0]
        counts.add(logits.argmax(-1), batch.targets[i:i + EVAL_BATCH],
                   batch.mask[i:i + EVAL_BATCH])
    return counts.accuracies()
