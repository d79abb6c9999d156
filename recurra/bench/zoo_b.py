"""``recurra bench zoo_b``: fsmn, titans and plstm: parallel forms vs step loops, step memory.

Two measurements, float32, timed side by side in one process (interleaved, medians):

1. each layer's parallel form vs its own ``step`` loop at (B, T, d_model) = (4, 4096, 256),
   forward (no grad) and forward+backward. Goal: >= 10x.
   Titans' step loop keeps ~35 MB of autograd graph per token at B=4 (a plain loop over 4096
   tokens would need ~140 GB), so its forward+backward step loop runs with activation
   checkpointing every ``--titans-checkpoint`` steps (the forward is recomputed during backward:
   about one extra forward of the loop's cost, stated next to those rows). Its forward rows are
   the plain loop under ``no_grad``.
2. step-mode memory per generated token at T = 1k, 10k, 100k (B=1, d_model=256) for the causal
   configurations: the state's bytes after a prefill of T tokens (fed in pieces, the state
   carried), and the process's resident-memory growth over 256 decode steps from there.
   Goal: constant in T.
Outputs are checked equal (parallel vs step loop) before anything is timed.
"""

from __future__ import annotations

import time

from .zoo import (
    held_lock,
    parallel_pass,
    selected,
    step_loop,
    step_memory,
    step_memory_table,
    step_memory_verdicts,
)

DESCRIPTION = "fsmn / titans / plstm: parallel vs step loop, step memory constant in T"

LAYERS = {
    "fsmn (order 20)": ("fsmn", {"lookback_order": 20}),
    "fsmn gated dilated (order 4, 3 levels)": ("fsmn", {"lookback_order": 4, "gated": True,
                                                        "dilation_levels": 3}),
    "titans lmm (4 heads, chunk 64)": ("titans", {"heads": 4, "chunk": 64}),
    "titans mag (window 128)": ("titans", {"variant": "mag", "heads": 4, "chunk": 64,
                                           "window": 128}),
    "titans mal (window 128)": ("titans", {"variant": "mal", "heads": 4, "chunk": 64,
                                           "window": 128}),
    "titans mac (segment 64)": ("titans", {"variant": "mac", "heads": 4, "chunk": 64}),
    "plstm P (4 heads, chunk 64)": ("plstm", {"heads": 4, "chunk": 64}),
    "plstm D (4 heads, chunk 64)": ("plstm", {"heads": 4, "chunk": 64, "mode": "D"}),
}
MEMORY_LAYERS = ["fsmn (order 20)", "fsmn gated dilated (order 4, 3 levels)",
                 "titans lmm (4 heads, chunk 64)", "titans mag (window 128)",
                 "titans mac (segment 64)", "plstm P (4 heads, chunk 64)"]


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few rounds (a smoke run, not a measurement)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (parallel forms)")
    parser.add_argument("--titans-T", type=int, default=4096,
                        help="sequence length for the titans layers (default 4096)")
    parser.add_argument("--titans-checkpoint", type=int, default=64,
                        help="titans fwd+bwd step loop: checkpoint every N steps (default 64)")
    parser.add_argument("--titans-backward", default="",
                        help="comma-separated substrings: titans layers whose fwd+bwd is "
                             "measured (default all; 'none' = forward only)")
    parser.add_argument("--passes", default="fwd,fwd+bwd",
                        help="which passes to time: fwd, fwd+bwd or both (default)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory test")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: run only the matching layer labels")
    parser.add_argument("--lock", default="",
                        help="hold an flock on this file around each layer's timed section "
                             "(e.g. /work/bench.lock on a shared machine)")


def _command(args) -> str:
    parts = ["recurra bench zoo_b", f"--threads {args.threads}", f"--rounds {args.rounds}",
             f"--titans-T {args.titans_T}", f"--titans-checkpoint {args.titans_checkpoint}"]
    parts += [flag for flag, on in (("--quick", args.quick), ("--skip-memory", args.skip_memory))
              if on]
    if args.passes != "fwd,fwd+bwd":
        parts.append(f"--passes {args.passes}")
    parts += [f"{flag} '{value}'" for flag, value in (("--titans-backward", args.titans_backward),
                                                      ("--only", args.only),
                                                      ("--lock", args.lock)) if value]
    return " ".join(parts)


def _with_backward(args, label: str) -> bool:
    if not label.startswith("titans"):
        return True
    if args.titans_backward.strip() == "none":
        return False
    return bool(selected(args.titans_backward, [label]))


# --------------------------------------------------------------------------- 1. parallel vs step
def parallel_vs_step(args, rows, records):
    import torch
    from tqdm import tqdm

    from ..layers import build
    from .harness import assert_same, time_methods

    for label in tqdm(selected(args.only, LAYERS), desc="parallel vs step"):
        name, options = LAYERS[label]
        B, T, D = (2, 128, 64) if args.quick else (4, 4096, 256)
        if name == "titans" and not args.quick:
            T = args.titans_T
        every = args.titans_checkpoint if name == "titans" else 0
        torch.manual_seed(0)
        layer = build(name, D, **options)
        x = torch.randn(B, T, D)
        rec = {"layer": label, "options": options, "B": B, "T": T, "d_model": D}
        passes = [(kind, grad) for kind, grad in (("fwd", False), ("fwd+bwd", True))
                  if kind in args.passes.split(",")
                  and (not grad or _with_backward(args, label))]
        t0 = time.perf_counter()
        y_step = step_loop(layer, x, False)()  # untimed: the equality check
        step_s = time.perf_counter() - t0
        diff = assert_same(y_step, parallel_pass(layer, x, False)(), atol=1e-4, rtol=1e-3,
                           what=f"{label}: parallel vs step loop")
        rec["max_diff"] = diff
        # a loop of minutes is steady: one interleaved round of it, then more rounds of the
        # parallel form alone
        slow_rounds = 1 if (step_s > 60 or args.quick) else (2 if step_s > 10 else 3)
        for kind, grad in passes:
            loop = "step loop"
            if grad and every:
                loop = f"step loop (checkpoint every {every})"
            with held_lock(args.lock):  # one hold per pass
                res = time_methods({loop: step_loop(layer, x, grad, every if grad else 0),
                                    "parallel": parallel_pass(layer, x, grad)},
                                   rounds=slow_rounds, warmup=0)
                fast = time_methods({"parallel": parallel_pass(layer, x, grad)},
                                    rounds=args.rounds if not args.quick else 2, warmup=1)
            par = min(res["parallel"].median_ms, fast["parallel"].median_ms)
            ratio = res[loop].median_ms / par
            rec[kind] = {"step_ms": res[loop].median_ms, "parallel_ms": par,
                         "ratio": ratio, "step_loop": loop}
            pass_name = kind if loop == "step loop" else f"{kind}, {loop}"
            rows.append([label, f"B={B} T={T} d={D}", pass_name, res[loop].median_ms, par,
                         ratio, ">= 10x", "met" if ratio >= 10 else "NOT met", f"{diff:.1e}"])
        records.append(rec)


def run(args) -> None:
    import torch

    from .harness import bar_chart, write_results

    torch.set_num_threads(args.threads)
    rows, records, mem_rows, mem_records = [], [], [], []
    parallel_vs_step(args, rows, records)
    if not args.skip_memory:
        configs = {label: LAYERS[label] for label in selected(args.only, MEMORY_LAYERS)}
        mem_rows, mem_records = step_memory(configs, args.quick, args.lock)
    notes = _verdict(rows, mem_records, args) + step_memory_table(mem_rows)
    header = ["layer", "size", "pass", "step loop ms", "parallel ms", "speedup", "goal",
              "verdict", "max diff"]
    md = write_results(args.out, "Layer zoo B (fsmn, titans, plstm): parallel forms vs step loops"
                       " (float32)", _command(args), header, rows,
                       extra={"records": records, "memory": mem_records}, notes=notes)
    if rows:
        bar_chart(args.out + ".png", "zoo_b: speedup of the parallel form over the step loop",
                  [f"{r[0]} ({r[2]})" for r in rows],
                  {"speedup (step loop / parallel)": [r[5] for r in rows]}, "speedup", hline=10.0)
    print(md)


def _verdict(rows, mem_records, args) -> str:
    lines = ["### Goals"]
    if args.quick:
        lines.append("QUICK RUN (tiny sizes): not a measurement of the goals.")
    elif args.titans_T != 4096:
        lines.append(f"Titans rows run at T = {args.titans_T} (not the goal's 4096).")
    if any("checkpoint every" in r[2] for r in rows):
        lines.append("Titans fwd+bwd: the step loop runs with activation checkpointing (a plain "
                     "loop's autograd graph does not fit in memory at this T); it recomputes "
                     "the loop's forward during backward, so it costs about one forward more "
                     "than a plain loop would (compare with the fwd row).")
    for r in rows:
        lines.append(f"- {r[0]} ({r[2]}): {r[5]:.1f}x, goal {r[6]}: **{r[7]}**")
    lines += step_memory_verdicts(mem_records)
    if args.lock:
        lines.append(f"\nTimed holding `{args.lock}` (flock) around each pass's timing (the "
                     "untimed equality check runs outside it).")
    return "\n".join(lines)
