"""``recurra bench zoo_b``: fsmn, titans and plstm: parallel forms vs step loops, step memory.

Two measurements, float32, timed side by side in one process (interleaved, medians):

1. each layer's parallel form vs its own ``step`` loop at (B, T, d_model) = (4, 4096, 256),
   forward (no grad) and forward+backward. Titans runs at T = 256 (``--titans-T``): its step
   loop costs 20-70 ms per token (B=4) and its autograd graph ~35 MB per token (MAC at T=512
   was OOM-killed at 18 GB), so 4096 steps x several rounds with backward do not fit;
   the ratio is per sequence at that T. Goal: >= 10x.
2. step-mode memory per generated token at T = 1k, 10k, 100k (B=1, d_model=256) for the causal
   configurations: the state's bytes after a prefill of T tokens (fed in pieces, the state
   carried), and the process's resident-memory growth over 256 decode steps from there.
   Goal: constant in T.
Outputs are checked equal (parallel vs step loop) before anything is timed.
"""

from __future__ import annotations

import time

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
    parser.add_argument("--titans-T", type=int, default=256,
                        help="sequence length for the titans layers (default 256)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory test")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: run only the matching layer labels")


def _command(args) -> str:
    parts = ["recurra bench zoo_b", f"--threads {args.threads}", f"--rounds {args.rounds}",
             f"--titans-T {args.titans_T}"]
    parts += [flag for flag, on in (("--quick", args.quick), ("--skip-memory", args.skip_memory))
              if on]
    if args.only:
        parts.append(f"--only '{args.only}'")
    return " ".join(parts)


def _selected(args, labels):
    keys = [s.strip() for s in args.only.split(",") if s.strip()]
    return [l for l in labels if not keys or any(k in l for k in keys)]


# --------------------------------------------------------------------------- 1. parallel vs step
def parallel_vs_step(args, rows, records):
    import torch
    from tqdm import tqdm

    from ..layers import build
    from .harness import assert_same, time_methods

    for label in tqdm(_selected(args, list(LAYERS)), desc="parallel vs step"):
        name, options = LAYERS[label]
        B, T, D = (2, 128, 64) if args.quick else (4, 4096, 256)
        if name == "titans" and not args.quick:
            T = args.titans_T
        torch.manual_seed(0)
        layer = build(name, D, **options)
        x = torch.randn(B, T, D)

        def steps(grad):
            def call():
                state = layer.init_state(B)
                ys = []
                with torch.set_grad_enabled(grad):
                    xg = x.detach().requires_grad_(grad)
                    for x_t in xg.unbind(1):
                        y_t, state = layer.step(x_t, state)
                        ys.append(y_t)
                    y = torch.stack(ys, 1)
                    if grad:
                        y.sum().backward()
                return y
            return call

        def parallel(grad):
            def call():
                with torch.set_grad_enabled(grad):
                    y = layer(x.detach().requires_grad_(grad))[0]
                    if grad:
                        y.sum().backward()
                return y
            return call

        t0 = time.perf_counter()
        y_step = steps(False)()
        step_s = time.perf_counter() - t0
        diff = assert_same(y_step, parallel(False)(), atol=1e-4, rtol=1e-3,
                           what=f"{label}: parallel vs step loop")
        slow_rounds = 2 if (step_s > 10 or args.quick) else 3
        rec = {"layer": label, "options": options, "B": B, "T": T, "d_model": D,
               "max_diff": diff}
        for kind, grad in (("fwd", False), ("fwd+bwd", True)):
            res = time_methods({"step loop": steps(grad), "parallel": parallel(grad)},
                               rounds=slow_rounds, warmup=0)
            fast = time_methods({"parallel": parallel(grad)},
                                rounds=args.rounds if not args.quick else 2, warmup=1)
            par = min(res["parallel"].median_ms, fast["parallel"].median_ms)
            ratio = res["step loop"].median_ms / par
            rec[kind] = {"step_ms": res["step loop"].median_ms, "parallel_ms": par,
                         "ratio": ratio}
            rows.append([label, f"B={B} T={T} d={D}", kind, res["step loop"].median_ms, par,
                         ratio, ">= 10x", "met" if ratio >= 10 else "NOT met", f"{diff:.1e}"])
        records.append(rec)


# --------------------------------------------------------------------------- 2. step memory
def step_memory(args, mem_rows, mem_records):
    import torch
    from tqdm import tqdm

    from ..layers import build
    from .harness import measure_step_memory

    D = 64 if args.quick else 256
    lengths = [1000, 10000] if args.quick else [1000, 10000, 100000]
    for label in tqdm(_selected(args, MEMORY_LAYERS), desc="step memory"):
        name, options = LAYERS[label]
        torch.manual_seed(0)
        layer = build(name, D, **options)
        rec = {"layer": label, "d_model": D, "points": []}
        for T in lengths:
            point = measure_step_memory(layer, D, T)
            rec["points"].append(point)
            mem_rows.append([label, T, point["state_bytes"], point["rss_growth"] / 256,
                             point["step_ms"]])
        mem_records.append(rec)


def run(args) -> None:
    import torch

    from .harness import bar_chart, markdown_table, write_results

    torch.set_num_threads(args.threads)
    rows, records, mem_rows, mem_records = [], [], [], []
    parallel_vs_step(args, rows, records)
    if not args.skip_memory:
        step_memory(args, mem_rows, mem_records)
    notes = _verdict(rows, mem_records, args)
    if mem_rows:
        notes += ("\n\n### Step-mode memory per generated token (B=1, float32)\n\n"
                  + markdown_table(["layer", "T (prefilled)", "state bytes",
                                    "RSS growth per step (bytes)", "ms per step"], mem_rows))
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
    if not args.quick:
        lines.append(f"Titans rows run at T = {args.titans_T} (not 4096): its step loop is slow.")
    for r in rows:
        lines.append(f"- {r[0]} ({r[2]}): {r[5]:.1f}x, goal {r[6]}: **{r[7]}**")
    for rec in mem_records:
        pts = rec["points"]
        same_state = len({p["state_bytes"] for p in pts}) == 1
        grows = max(p["rss_growth"] for p in pts) / 256
        lines.append(f"- {rec['layer']} step memory: state {pts[0]['state_bytes']} bytes at every "
                     f"T ({'constant' if same_state else 'NOT constant'}); max RSS growth "
                     f"{grows:.0f} bytes per step: goal (constant in T) "
                     f"**{'met' if same_state and grows < 64 else 'NOT met'}**")
    return "\n".join(lines)
