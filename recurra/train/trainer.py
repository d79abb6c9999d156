"""The training loop: byte-level language modelling with stateful truncated back-propagation.

    corpus -> bytes -> B parallel streams per rank (recurra.train.streams)
    for each step:
        batch k continues every stream; the recurrent state from batch k-1 is carried in, detached
        loss = next-byte cross-entropy; backward (DDP averages gradients across ranks)
        clip the gradient norm; AdamW step; warm-up + cosine learning rate
        every eval_every steps and at the end: validation loss and bits per byte (rank 0),
        then a checkpoint (rank 0 writes; every rank's carried state and RNG state are gathered)

With ``prefix_length`` > 0 (JRT prefix training, for models whose layers read a prefix): every
batch is a set of fresh sequences (no carried state), the first ``prefix_length`` bytes of each
are its prefix, and the loss is :func:`recurra.train.prefix_objective.prefix_lm_loss` (next-byte
loss on the suffix + ``mlm_weight`` x masked-LM loss on the prefix); validation scores the
suffixes of windows with clean prefixes.

A run stopped after a checkpoint and resumed with ``resume=True`` computes exactly the losses the
uninterrupted run computes: weights, optimizer, scheduler, RNG states and the carried recurrent
states are all restored, and the data position is a function of the step.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..models import RecurrentLM, build_model
from ..tasks.corpus import load_corpus
from . import checkpoint as ckpt
from .config import TrainConfig
from .distributed import Distributed, barrier, gather, mean_across_ranks, setup, teardown
from .evaluate import (
    at_least_float32,
    bits,
    evaluate_loss,
    evaluate_prefix_loss,
    stream_targets,
    unigram_bits_per_byte,
)
from .prefix_objective import prefix_lm_loss
from .schedule import make_scheduler
from .streams import TokenStreams

METRICS = "metrics.jsonl"


@dataclass
class TrainResult:
    #: optimizer steps done (the checkpoint's step)
    step: int
    #: (step, mean training loss in nats) of the steps this call ran
    losses: list[tuple[int, float]] = field(default_factory=list)
    #: one dict per evaluation: step, val_loss (nats), val_bpb
    evals: list[dict[str, float]] = field(default_factory=list)
    unigram_bpb: float = float("nan")
    model: torch.nn.Module | None = None
    out: Path | None = None
    seconds: float = 0.0
    tokens: int = 0


def bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def data_position(corpus_train: bytes, streams: TokenStreams, step: int) -> dict[str, Any]:
    """Where the next batch reads, and a fingerprint of the text (a resume checks it)."""
    return {"sha256": hashlib.sha256(corpus_train).hexdigest(), "bytes": len(corpus_train),
            "batches_per_epoch": streams.batches_per_epoch,
            "epoch": step // streams.batches_per_epoch,
            "batch_in_epoch": step % streams.batches_per_epoch}


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices (dim >= 2) only, not on biases and norm gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def _detach(state):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.detach()
    return tuple(_detach(s) for s in state)


def _to(state, device):
    if state is None:
        return None
    if isinstance(state, torch.Tensor):
        return state.to(device)
    return tuple(_to(s, device) for s in state)


def _rng_state(device: torch.device) -> dict[str, Any]:
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def _set_rng_state(rng: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], device)


# A resumed run may change only these (the rest fixes what it computes, and the optimizer and
# scheduler states restore lr, betas and weight decay, so a change there would be ignored).
_RESUME_FREE = ("steps", "eval_every", "device", "out", "grad_clip")


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    current = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as saved
    defaults = json.loads(json.dumps(TrainConfig().to_dict()))
    for name in sorted(set(current) - set(_RESUME_FREE)):
        # a checkpoint written before a setting existed was trained with its default
        if saved.get(name, defaults.get(name)) != current[name]:
            raise ValueError(
                f"cannot resume: {name} is {current[name]!r} but the checkpoint was trained with "
                f"{saved.get(name)!r}"
            )


def _check_world_size(state: dict, world_size: int) -> None:
    if len(state["ranks"]) != world_size:
        raise ValueError(
            f"cannot resume: the checkpoint holds {len(state['ranks'])} ranks' streams, this run "
            f"has {world_size} (resume with the same torchrun --nproc_per_node)"
        )


def _log(out: Path, row: dict[str, Any]) -> None:
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_log(out: Path, step: int) -> None:
    """Drop rows logged after the checkpoint we resume from (they will be computed again)."""
    path = out / METRICS
    if path.is_file():
        rows = [line for line in path.read_text().splitlines()
                if line and json.loads(line)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def train(config: TrainConfig, resume: bool = False, stop_after: int | None = None,
          verbose: bool = True) -> TrainResult:
    """Train ``config.model`` on ``config.data``; write checkpoints and metrics to ``config.out``.

    ``stop_after``: stop (with a checkpoint) once this many steps are done, as if interrupted
    there; ``resume=True`` continues from the checkpoint in ``config.out``.
    """
    ctx = setup(config.device)
    try:
        return _train(config, ctx, resume, stop_after, verbose)
    finally:
        teardown(ctx)


def _train(config: TrainConfig, ctx: Distributed, resume: bool, stop_after: int | None,
           verbose: bool) -> TrainResult:
    from tqdm import tqdm

    device, out = ctx.device, Path(config.out)
    say = tqdm.write if (verbose and ctx.is_main) else (lambda *_: None)

    # ---- data: this rank's streams of the training bytes, all of the validation bytes
    corpus = load_corpus(config.data)
    train_bytes, val_bytes = bytes_tensor(corpus.train), bytes_tensor(corpus.validation)
    if config.model.get("vocab_size") != 256:
        raise ValueError(f"the model's vocab_size must be 256 for byte-level text, got "
                         f"{config.model.get('vocab_size')!r}")
    streams = TokenStreams(train_bytes, ctx.world_size * config.batch_size, config.seq_len,
                           first=ctx.rank * config.batch_size, count=config.batch_size)
    val_targets = stream_targets(val_bytes, config.eval_batch_size)
    unigram_bpb = unigram_bits_per_byte(train_bytes, val_targets)

    # ---- model, optimizer, schedule (the same initial weights on every rank)
    torch.manual_seed(config.seed)
    model = build_model(config.model).to(device)
    prefix_mode = config.prefix_length > 0
    if prefix_mode:
        _check_prefix_model(model, config)
        if config.mask_token in set(corpus.train[:1_000_000]):
            warnings.warn(f"mask_token {config.mask_token} occurs in the training text: masked "
                          "prefix bytes are then indistinguishable from real ones (choose "
                          "another byte with mask_token)", stacklevel=2)
    else:
        _check_causal_model(model)
    stateful = isinstance(model, RecurrentLM) and not prefix_mode
    optimizer = make_optimizer(model, config)
    scheduler = make_scheduler(optimizer, config.warmup_steps, config.steps, config.min_lr_ratio)
    torch.manual_seed(config.seed + 7919 * (ctx.rank + 1))  # per-rank dropout masks
    step, carried = 0, None

    if resume:
        _check_resumable(ckpt.read_config(out)["train"], config)
        step = ckpt.load_weights(model, out, device)
        state = ckpt.load_training_state(out, step)
        _check_world_size(state, ctx.world_size)
        if state["data"]["sha256"] != data_position(corpus.train, streams, step)["sha256"]:
            source = config.data or "the embedded corpus"
            raise ValueError(f"cannot resume: the training text of {source!r} has changed since "
                             f"the checkpoint was written")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mine = state["ranks"][ctx.rank]
        _set_rng_state(mine["rng"], device)
        carried = _to(mine["carried"], device)
        if ctx.is_main:
            _truncate_log(out, step)
        say(f"resumed from {out} at step {step}")
    elif ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / METRICS).unlink(missing_ok=True)

    if ctx.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        say(f"{corpus}; model: {n_params:,} parameters, {config.model.get('layer', '')} "
            f"x{config.model.get('n_layers')}, d_model {config.model.get('d_model')}; "
            f"{ctx.world_size} process(es) on {device}")

    net = model
    if ctx.enabled:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                      else None)

    result = TrainResult(step=step, unigram_bpb=unigram_bpb, model=model, out=out)
    tokens_per_step = ctx.world_size * config.batch_size * config.seq_len
    last = config.steps if stop_after is None else min(config.steps, stop_after)
    bar = tqdm(total=config.steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (verbose and ctx.is_main))
    start = time.perf_counter()
    model.train()
    while step < last:
        x, y, new_epoch = streams.batch(step)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if new_epoch:
            carried = None
        parts = None
        if prefix_mode:
            parts = prefix_lm_loss(net, x, y, config.prefix_length, config.mask_token,
                                   config.mlm_weight, config.mask_prob)
            loss = parts.total
        else:
            if stateful:
                logits, carried = net(x, carried)
                carried = _detach(carried)
            else:
                logits = net(x)[0]
            loss = F.cross_entropy(at_least_float32(logits).reshape(-1, logits.shape[-1]),
                                   y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        step += 1

        mean_loss = mean_across_ranks(ctx, loss.detach()).item()
        result.losses.append((step, mean_loss))
        result.tokens += tokens_per_step
        elapsed = time.perf_counter() - start
        if ctx.is_main:
            row = {"step": step, "loss": mean_loss, "lr": lr}
            if parts is not None:  # this rank's parts of the loss
                row.update(next_token_loss=parts.next_token.item(),
                           masked_lm_loss=parts.masked_lm.item())
            _log(out, row)
            bar.set_postfix(loss=f"{mean_loss:.3f}", tok_s=f"{result.tokens / elapsed:,.0f}")
            bar.update(1)

        if step % config.eval_every == 0 or step == config.steps:
            if ctx.is_main:
                if prefix_mode:
                    val_loss = evaluate_prefix_loss(model, val_bytes, config.eval_batch_size,
                                                    config.seq_len, config.prefix_length, device)
                else:
                    val_loss = evaluate_loss(model, val_bytes, config.eval_batch_size,
                                             config.seq_len, device, stateful)
                row = {"step": step, "val_loss": val_loss, "val_bpb": bits(val_loss)}
                result.evals.append(row)
                _log(out, row)
                say(f"step {step}: validation {val_loss:.4f} nats = {bits(val_loss):.3f} bits "
                    f"per byte (unigram baseline {unigram_bpb:.3f})")
            _save(ctx, out, model, config, step, optimizer, scheduler, carried,
                  data_position(corpus.train, streams, step))
    if step == last and last != config.steps and step % config.eval_every != 0:
        _save(ctx, out, model, config, step, optimizer, scheduler, carried,  # clean stop
              data_position(corpus.train, streams, step))
    bar.close()
    result.step = step
    result.seconds = time.perf_counter() - start
    return result


def _check_prefix_model(model, config: TrainConfig) -> None:
    if not getattr(model, "reads_prefix", False):
        raise ValueError(
            f"prefix_length={config.prefix_length} needs a model whose layers read a prefix "
            f"(e.g. layer 'jrt'); layer {config.model.get('layer')!r} of architecture "
            f"{config.model.get('architecture', 'recurrent')!r} does not")
    vocab = config.model.get("vocab_size")
    if not config.mask_token < vocab:
        raise ValueError(f"mask_token {config.mask_token} is not a token of the model's "
                         f"vocabulary of {vocab}")


def _check_causal_model(model) -> None:
    """Stateful next-token training needs every layer causal: a prefix layer only when its
    default prefix is 0 (then it reads causally)."""
    prefixes = {getattr(m, "prefix_length", None) for m in model.modules()
                if getattr(m, "causal_after_prefix", False) and not getattr(m, "causal", True)}
    prefixes.discard(0)
    if prefixes:
        raise ValueError(
            f"the model's layers read a prefix of {sorted(prefixes)} tokens non-causally, so "
            "plain next-token training would let positions see their targets: train with "
            "prefix_length > 0 (--prefix-length, the JRT objective), or give the layer "
            "prefix_length=0 (--layer-opt prefix_length=0) to train it causally")


def _save(ctx: Distributed, out: Path, model, config: TrainConfig, step: int, optimizer,
          scheduler, carried, data: dict[str, Any]) -> None:
    mine = {"rng": _rng_state(ctx.device), "carried": _to(carried, "cpu")}
    ranks = gather(ctx, mine)
    if ctx.is_main:
        ckpt.save_checkpoint(out, model, config.to_dict(), step, {
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "world_size": ctx.world_size, "ranks": ranks, "data": data,
        })
    barrier(ctx)
