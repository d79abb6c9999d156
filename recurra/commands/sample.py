"""``recurra sample CHECKPOINT --prompt TEXT``: continue a prompt with a trained byte-level model."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("sample", help="generate text from a trained checkpoint")
    parser.add_argument("checkpoint", help="checkpoint folder (the --out of `recurra train`)")
    parser.add_argument("--prompt", default="The ", help="text to continue (default 'The ')")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate")
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="softmax temperature; 0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=None, help="keep the k most likely bytes")
    parser.add_argument("--top-p", type=float, default=None,
                        help="keep the smallest set of bytes with probability >= p (nucleus)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--strategy", default=None,
                        choices=["greedy", "sample", "beam", "diverse_beam"],
                        help="decoding strategy (default: greedy if --temperature 0, else sample)")
    parser.add_argument("--num-beams", type=int, default=4, help="beams for --strategy beam")
    parser.add_argument("--speculative", default="none",
                        choices=["none", "prompt-lookup", "token-recycling", "aded"],
                        help="lossless speculative decoding (greedy / sample; same output)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="CTRL repetition penalty (> 1 discourages repeats)")
    parser.set_defaults(func=run)


def sample_tokens(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                  top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> list[int]:
    """Ancestral sampling: feed the prompt once, then one token at a time with the carried
    state (recurrent models) or cache (transformers); returns the new token ids."""
    import torch

    if not prompt_ids:
        raise ValueError("prompt must hold at least one token (give a non-empty --prompt)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[int] = []
    with torch.no_grad():
        logits, memory = model(torch.tensor([prompt_ids], device=device))
        for _ in range(max_new_tokens):
            scores = logits[0, -1].float()
            token = pick_token(scores, temperature, top_k, top_p, generator)
            out.append(token)
            logits, memory = model(torch.tensor([[token]], device=device), memory)
    return out


def pick_token(scores, temperature: float, top_k: int | None, top_p: float | None,
               generator) -> int:
    """One token from next-token ``scores`` (V,), after temperature, top-k and top-p."""
    import torch

    if temperature == 0:
        return int(scores.argmax())
    scores = scores / temperature
    if top_k is not None and top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        probs, order = torch.sort(scores.softmax(-1), descending=True)
        before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop = order[before >= top_p]
        scores = scores.index_fill(0, drop, float("-inf"))
    return int(torch.multinomial(scores.softmax(-1), 1, generator=generator))


def run(args) -> int:
    from recurra.commands.train import quiet_openmp

    quiet_openmp()
    import sys

    from recurra.decode import generate
    from recurra.tasks.byte_tokenizer import ByteTokenizer
    from recurra.train.checkpoint import load_model

    model = load_model(args.checkpoint, device=args.device)
    tokenizer = ByteTokenizer()
    prompt_ids = tokenizer.encode(args.prompt)
    if not prompt_ids:
        raise ValueError("prompt must hold at least one token (give a non-empty --prompt)")
    strategy = args.strategy or ("greedy" if args.temperature == 0 else "sample")
    speculative = None if args.speculative == "none" else args.speculative.replace("-", "_")
    out = generate(model, [prompt_ids], args.max_new_tokens, strategy=strategy,
                   speculative=speculative, num_beams=args.num_beams,
                   temperature=args.temperature if strategy == "sample" else 1.0,
                   top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                   repetition_penalty=args.repetition_penalty)
    print(args.prompt + tokenizer.decode(out.tokens[0].tolist()))
    stats = out.stats
    print(f"[{strategy}{'' if speculative is None else ' + ' + args.speculative}] "
          f"{stats.new_tokens} tokens in {stats.seconds:.2f} s: {stats.tokens_per_s:.1f} "
          f"tokens/s, {stats.mean_accepted:.2f} mean accepted tokens per step",
          file=sys.stderr)
    return 0
