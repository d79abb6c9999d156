"""``recurra train``: train a byte-level language model (default: a small LSTM on the embedded
pydoc corpus, a few minutes on two CPU cores), then report validation bits per byte next to a
unigram baseline and print a sample. ``torchrun --nproc_per_node=N -m recurra train ...`` trains
data-parallel."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train a byte-level language model: by default a small LSTM on the embedded pydoc corpus (a few
minutes on two CPU cores); then print validation bits per byte next to a unigram baseline, and a
sample. Checkpoints go to --out; --resume continues a run exactly.
Data parallel: torchrun --nproc_per_node=N -m recurra train ...  (see docs/training.md)"""

# flags that map one-to-one onto TrainConfig fields
_TRAIN_FLAGS = ("seq_len", "batch_size", "steps", "lr", "warmup_steps", "weight_decay",
                "grad_clip", "seed", "eval_every", "device", "data", "prefix_length",
                "mlm_weight", "mask_prob", "mask_token")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a byte-level language model (default: small LSTM, pydoc text)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model (with --resume: taken from the checkpoint; a flag given must match)")
    m.add_argument("--layer", help="registered layer name (see `recurra layers`), or "
                   "'transformer'; default lstm")
    m.add_argument("--mode", help="forwarded as the layer option `mode` (e.g. for paragru)")
    m.add_argument("--layer-opt", action="append", default=[], metavar="KEY=VALUE",
                   help="layer option (repeatable); VALUE is read as int, float, bool or str")
    m.add_argument("--d-model", type=int, help="width (default 128)")
    m.add_argument("--n-layers", type=int, help="blocks (default 2)")
    m.add_argument("--mlp-ratio", type=float, help="MLP width / d_model, 0 = none (default 2)")
    m.add_argument("--dropout", type=float, help="dropout (default 0)")
    t = p.add_argument_group("training")
    t.add_argument("--data", help="text file or folder (default: the embedded pydoc corpus)")
    t.add_argument("--seq-len", type=int, help="tokens per stream per step (default 32)")
    t.add_argument("--batch-size", type=int, help="streams per process (default 64)")
    t.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 4e-3)")
    t.add_argument("--warmup-steps", type=int, help="linear warm-up steps (default 30)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.1)")
    t.add_argument("--grad-clip", type=float, help="gradient norm clip (default 1.0)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    t.add_argument("--eval-every", type=int, help="evaluate + checkpoint every N steps (default 200)")
    t.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    t.add_argument("--prefix-length", type=int,
                   help="JRT prefix training (layers that read a prefix, e.g. --layer jrt): the "
                   "first N bytes of every window are its prefix; loss = next-byte loss after "
                   "it + MLM loss on it (default 0 = off; see docs/training.md)")
    t.add_argument("--mlm-weight", type=float, help="prefix MLM loss weight (default 0.25)")
    t.add_argument("--mask-prob", type=float, help="prefix bytes masked (default 0.15)")
    t.add_argument("--mask-token", type=int, help="byte used as the mask (default 0, NUL)")
    t.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    t.add_argument("--out", default="runs/default", help="checkpoint folder (default runs/default)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (exactly)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar or log lines")
    t.add_argument("--sample-tokens", type=int, default=200,
                   help="bytes to sample at the end (0 = none)")
    p.set_defaults(func=run)


def parse_value(text: str):
    """'3' -> 3, '0.5' -> 0.5, 'true'/'false' -> bool, anything else -> the string."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def layer_options(args) -> dict:
    options = {}
    for item in args.layer_opt:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--layer-opt must look like KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = parse_value(value.strip())
    if args.mode is not None:
        options["mode"] = args.mode
    return options


def model_config(args, base: dict) -> dict:
    """The model config: ``base`` with the model flags that were given applied."""
    config = dict(base)
    if args.layer == "transformer":
        shared = ("vocab_size", "d_model", "n_layers", "mlp_ratio", "dropout", "tie_weights")
        config = {"architecture": "transformer", **{k: base[k] for k in shared if k in base}}
    elif args.layer is not None:
        config["architecture"], config["layer"] = "recurrent", args.layer
    options = layer_options(args)
    if config.get("architecture") == "transformer":
        config.update(options)
    elif options or args.layer is not None:
        config["layer_options"] = options
    for flag, key in (("d_model", "d_model"), ("n_layers", "n_layers"),
                      ("mlp_ratio", "mlp_ratio"), ("dropout", "dropout")):
        value = getattr(args, flag)
        if value is not None:
            config[key] = int(value) if key == "mlp_ratio" and float(value).is_integer() else value
    return config


def build_config(args):
    from recurra.train.checkpoint import read_config
    from recurra.train.config import TrainConfig

    if args.resume:
        base = TrainConfig.from_dict(read_config(args.out)["train"])
    else:
        base = TrainConfig()
    fields = base.to_dict()
    fields["model"] = model_config(args, base.model)
    for name in _TRAIN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    fields["out"] = args.out
    if (getattr(args, "prefix_length", None) and fields["model"].get("layer") == "jrt"
            and "prefix_length" not in fields["model"].get("layer_options", {})):
        # calls without prefix_lengths (e.g. `recurra sample`) then read the trained prefix
        fields["model"]["layer_options"] = {**fields["model"].get("layer_options", {}),
                                            "prefix_length": args.prefix_length}
    return TrainConfig.from_dict(fields)


def quiet_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spinning (``OMP_WAIT_POLICY=PASSIVE``) unless
    the user chose a policy. On a shared CPU, spinning threads made small models' steps up to
    30x slower in our measurements; it must be set before torch is first imported."""
    import os
    import sys

    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def run(args) -> int:
    quiet_openmp()
    import time

    import torch

    from recurra.train.trainer import train

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    config = build_config(args)
    started = time.perf_counter()
    result = train(config, resume=args.resume, verbose=not args.no_progress)
    if not result.losses and _is_main():
        print(f"the run in {config.out} is already at step {result.step} of {config.steps}; "
              f"nothing to train (give a larger --steps to continue it)")
    if result.evals and _is_main():
        final = result.evals[-1]
        print(f"validation: {final['val_bpb']:.3f} bits per byte after {result.step} steps "
              f"(unigram baseline {result.unigram_bpb:.3f}); {time.perf_counter() - started:.0f} s; "
              f"checkpoint in {config.out}")
        if args.sample_tokens > 0:
            from recurra.commands.sample import sample_tokens
            from recurra.tasks.byte_tokenizer import ByteTokenizer

            tokenizer = ByteTokenizer()
            prompt_ids = tokenizer.encode("The ")
            if config.prefix_length:  # JRT: the prompt holds the whole prefix
                from recurra.tasks.corpus import load_corpus

                prompt_ids = tokenizer.encode(
                    load_corpus(config.data).validation[:config.prefix_length])
            model = result.model.eval()
            new = sample_tokens(model, prompt_ids, args.sample_tokens,
                                temperature=0.8, seed=config.seed)
            print("sample:", tokenizer.decode(prompt_ids + new))
    return 0


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0
