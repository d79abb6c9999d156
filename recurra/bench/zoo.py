"""``recurra bench zoo``: mamba2, linear_attention, s4d and aaren: parallel forms, fla, memory.

Three measurements, float32, timed side by side in one process (interleaved, medians):

1. each layer's parallel form vs its own ``step`` loop at (B, T, d_model) = (4, 4096, 256),
   forward (no grad) and forward+backward. Goal: >= 10x for mamba2, linear_attention, s4d, aaren.
2. against the pure-PyTorch paths of flash-linear-attention (installed into the environment by
   this command with ``pip install --no-deps einops fla-core flash-linear-attention triton`` when
   missing; tests never need it), at equal sizes and equal math, outputs checked equal first:
   - fla's ``Mamba2`` layer ``torch_forward`` (its Triton-backed SiLU and gated RMSNorm swapped for
     torch equivalents) vs our ``mamba2`` layer with the same weights, at B=4, T=1024,
     d_model=128, 4 heads x 64, state 64. Goal: >= 5x faster forward+backward.
   - ``naive_chunk_linear_attn`` vs ``linear_attention_chunked`` (identity map, unnormalised),
     and ``naive_chunk_simple_gla`` vs ``ssd_chunked`` (the same scalar-decay recurrence), at
     B=4, T=1024, 4 heads, head dim 64. Goal: no slower than fla's naive chunked linear attention.
3. step-mode memory per generated token at T = 1k, 10k, 100k (B=1, d_model=256): the state's
   bytes after a prefill of T tokens, and the process's resident-memory growth over 256 decode
   steps from there. Goal: constant in T.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from contextlib import contextmanager

DESCRIPTION = "mamba2 / linear_attention / s4d / aaren: parallel vs step, vs fla, step memory"

LAYERS = {
    "mamba2": {"d_state": 64, "head_dim": 64},
    "linear_attention": {"heads": 4, "feature_map": "elu"},
    "s4d": {"d_state": 64},
    "aaren": {"heads": 4},
}
#: step-memory configurations besides LAYERS
MEMORY_EXTRA = {"mamba2 (window=256)": ("mamba2", {"d_state": 64, "head_dim": 64, "window": 256})}


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few rounds (a smoke run, not a measurement)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (parallel forms)")
    parser.add_argument("--skip-fla", action="store_true",
                        help="skip the flash-linear-attention comparison (no install attempted)")
    parser.add_argument("--skip-memory", action="store_true", help="skip the memory test")
    parser.add_argument("--only-fla", action="store_true",
                        help="run only the fla comparison (section 2), e.g. into another --out")
    parser.add_argument("--only", default="",
                        help="comma-separated substrings: only the matching layers (sections 1, 3)")
    parser.add_argument("--lock", default="",
                        help="hold an flock on this file around each layer's timed section "
                             "(e.g. /work/bench.lock on a shared machine)")


def _command(args) -> str:
    parts = ["recurra bench zoo", f"--threads {args.threads}", f"--rounds {args.rounds}"]
    parts += [flag for flag, on in (("--quick", args.quick), ("--skip-fla", args.skip_fla),
                                    ("--skip-memory", args.skip_memory),
                                    ("--only-fla", args.only_fla)) if on]
    parts += [f"{flag} '{value}'" for flag, value in (("--only", args.only),
                                                      ("--lock", args.lock)) if value]
    return " ".join(parts)


def _ensure_fla() -> bool:
    try:
        importlib.import_module("fla.layers.mamba2")
        return True
    except ImportError:
        pass
    print("installing fla (benchmark only): pip install --no-deps einops fla-core "
          "flash-linear-attention triton")
    code = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "einops",
                            "fla-core", "flash-linear-attention", "triton"])
    importlib.invalidate_caches()
    try:
        importlib.import_module("fla.layers.mamba2")
        return code == 0
    except ImportError as e:
        print(f"fla unavailable ({e}); skipping the fla comparison")
        return False


# --------------------------------------------------------------------------- shared by zoo_b
@contextmanager
def held_lock(path: str | None):
    """Hold an exclusive ``flock`` on ``path`` (the team's benchmark lock) for the block; no-op
    when ``path`` is empty. Suites take it around each layer's timed section, so one lock hold
    stays short while the whole suite writes one table."""
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def step_loop(layer, x, grad: bool, checkpoint_every: int = 0):
    """A callable running ``layer.step`` over ``x`` (B, T, D) token by token (and, with
    ``grad``, backward from ``y.sum()``). ``checkpoint_every`` = n > 0 wraps every n steps in
    ``torch.utils.checkpoint`` (the forward is recomputed in backward), for loops whose autograd
    graph would not fit in memory."""
    import torch
    from torch.utils.checkpoint import checkpoint

    def run_steps(x_part, *state):
        ys = []
        for x_t in x_part.unbind(1):
            y_t, state = layer.step(x_t, state)
            ys.append(y_t)
        return (torch.stack(ys, 1), *state)

    def call():
        state = layer.init_state(x.shape[0])
        with torch.set_grad_enabled(grad):
            xg = x.detach().requires_grad_(grad)
            if grad and checkpoint_every > 0:
                parts = []
                for part in xg.split(checkpoint_every, 1):
                    y_part, *state = checkpoint(run_steps, part, *state, use_reentrant=False)
                    parts.append(y_part)
                y = torch.cat(parts, 1)
            else:
                y = run_steps(xg, *state)[0]
            if grad:
                y.sum().backward()
        return y
    return call


def parallel_pass(layer, x, grad: bool):
    """A callable running the layer's parallel form over ``x`` (and backward with ``grad``)."""
    import torch

    def call():
        with torch.set_grad_enabled(grad):
            y = layer(x.detach().requires_grad_(grad))[0]
            if grad:
                y.sum().backward()
        return y
    return call


def step_memory(configs: dict[str, tuple[str, dict]], quick: bool, lock: str | None = None):
    """Step-mode memory after T = 1k, 10k, 100k prefilled tokens (B=1) for each labelled
    ``(layer name, options)``. Returns table rows and JSON records."""
    import torch
    from tqdm import tqdm

    from ..layers import build
    from .harness import measure_step_memory

    D = 64 if quick else 256
    lengths = [1000, 10000] if quick else [1000, 10000, 100000]
    rows, records = [], []
    for label, (name, options) in tqdm(configs.items(), desc="step memory"):
        torch.manual_seed(0)
        layer = build(name, D, **options)
        rec = {"layer": label, "d_model": D, "points": []}
        with held_lock(lock):
            for T in lengths:
                point = measure_step_memory(layer, D, T)
                rec["points"].append(point)
                rows.append([label, T, point["state_bytes"], point["rss_growth"] / 256,
                             point["step_ms"]])
        records.append(rec)
    return rows, records


def step_memory_verdicts(records) -> list[str]:
    """One goal line per layer: the state size is the same at every T and RSS does not grow."""
    lines = []
    for rec in records:
        pts = rec["points"]
        same_state = len({p["state_bytes"] for p in pts}) == 1
        grows = max(p["rss_growth"] for p in pts) / 256
        lines.append(f"- {rec['layer']} step memory: state {pts[0]['state_bytes']} bytes at every "
                     f"T ({'constant' if same_state else 'NOT constant'}); max RSS growth "
                     f"{grows:.0f} bytes per step: goal (constant in T) "
                     f"**{'met' if same_state and grows < 64 else 'NOT met'}**")
    return lines


def step_memory_table(rows) -> str:
    from .harness import markdown_table

    if not rows:
        return ""
    return ("\n\n### Step-mode memory per generated token (B=1, float32)\n\n"
            + markdown_table(["layer", "T (prefilled)", "state bytes",
                              "RSS growth per step (bytes)", "ms per step"], rows))


def selected(only: str, labels):
    """The labels matching any comma-separated substring of ``only`` (all when empty)."""
    keys = [s.strip() for s in only.split(",") if s.strip()]
    return [label for label in labels if not keys or any(k in label for k in keys)]


# --------------------------------------------------------------------------- 1. parallel vs step
def parallel_vs_step(args, rows, records):
    import torch
    from tqdm import tqdm

    from ..layers import build
    from .harness import assert_same, time_methods

    B, T, D = (2, 256, 64) if args.quick else (4, 4096, 256)
    for name in tqdm(selected(args.only, LAYERS), desc="parallel vs step"):
        torch.manual_seed(0)
        layer = build(name, D, **LAYERS[name])
        x = torch.randn(B, T, D)
        t0 = time.perf_counter()
        y_step = step_loop(layer, x, False)()  # untimed: the equality check
        step_s = time.perf_counter() - t0
        diff = assert_same(y_step, parallel_pass(layer, x, False)(), atol=1e-4, rtol=1e-3,
                           what=f"{name}: parallel vs step loop")
        rec = {"layer": name, "B": B, "T": T, "d_model": D, "max_diff": diff}
        # the loop takes seconds to minutes and is steady: a few rounds of it (one when it takes
        # over a minute), interleaved with the parallel form, then more rounds of the parallel
        # form alone
        slow_rounds = 1 if (step_s > 60 or args.quick) else (2 if step_s > 20 else 3)
        for kind, grad in (("fwd", False), ("fwd+bwd", True)):
            with held_lock(args.lock):  # one hold per pass: a few minutes each
                res = time_methods({"step loop": step_loop(layer, x, grad),
                                    "parallel": parallel_pass(layer, x, grad)},
                                   rounds=slow_rounds, warmup=0)
                fast = time_methods({"parallel": parallel_pass(layer, x, grad)},
                                    rounds=args.rounds if not args.quick else 2, warmup=1)
                par = fast["parallel"].median_ms
                ratio = res["step loop"].median_ms / par
                rec[kind] = {"step_ms": res["step loop"].median_ms, "parallel_ms": par,
                             "parallel_ms_interleaved": res["parallel"].median_ms,
                             "step_rounds": slow_rounds, "ratio": ratio}
                rows.append([f"{name} parallel vs own step loop", f"B={B} T={T} d={D}", kind,
                             res["step loop"].median_ms, par, ratio, ">= 10x",
                             "met" if ratio >= 10 else "NOT met", f"{diff:.1e}"])
        records.append(rec)


# --------------------------------------------------------------------------- 2. vs fla
def _fla_mamba2(ours):
    """fla's Mamba2 layer with our weights; its Triton SiLU and gated RMSNorm swapped for torch."""
    import torch
    from fla.layers.mamba2 import Mamba2 as FlaMamba2
    from torch import nn

    class GatedRMSNorm(nn.Module):  # norm_before_gate=False: norm(y * silu(z))
        def __init__(self, weight, eps):
            super().__init__()
            self.weight, self.eps = weight, eps

        def forward(self, y, z):
            y = y * nn.functional.silu(z)
            return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    fla = FlaMamba2(num_heads=ours.heads, head_dim=ours.head_dim, hidden_size=ours.input_size,
                    state_size=ours.d_state, expand=ours.d_inner // ours.input_size,
                    n_groups=ours.n_groups, conv_kernel=ours.conv_kernel,
                    chunk_size=ours.chunk_size)
    with torch.no_grad():
        fla.in_proj.weight.copy_(ours.in_proj.weight)
        fla.conv1d.weight.copy_(ours.conv_weight.unsqueeze(1))
        fla.conv1d.bias.copy_(ours.conv_bias)
        fla.dt_bias.copy_(ours.dt_bias)
        fla.A_log.copy_(ours.A_log)
        fla.D.copy_(ours.D)
        fla.out_proj.weight.copy_(ours.out_proj.weight)
    fla.act = nn.SiLU()
    fla.norm = GatedRMSNorm(nn.Parameter(ours.norm_weight.detach().clone()), ours.norm_eps)
    return fla


def versus_fla(args, rows, records):
    import torch
    from fla.ops.linear_attn.naive import naive_chunk_linear_attn
    from fla.ops.simple_gla.naive import naive_chunk_simple_gla

    from ..layers.mamba2 import Mamba2
    from ..ops.linear_attention import linear_attention_chunked
    from ..ops.ssd import ssd_chunked
    from .harness import assert_same, time_methods

    B, T = (2, 256) if args.quick else (4, 1024)
    rounds = 2 if args.quick else args.rounds
    torch.manual_seed(0)
    ours = Mamba2(128, d_state=64, head_dim=64, expand=2)      # 4 heads x 64, state 64
    fla = _fla_mamba2(ours)
    x = torch.randn(B, T, 128)

    def run(fn, grad):
        def call():
            with torch.set_grad_enabled(grad):
                y = fn(x.requires_grad_(grad))
                if grad:
                    y.sum().backward()
            return y
        return call

    mamba = {"fla Mamba2.torch_forward": lambda v: fla.torch_forward(v)[0],
             "recurra mamba2": lambda v: ours(v)[0]}
    diff = assert_same(run(mamba["fla Mamba2.torch_forward"], False)(),
                       run(mamba["recurra mamba2"], False)(), atol=1e-4, rtol=1e-3,
                       what="mamba2 vs fla torch_forward")
    rec = {"what": "mamba2 layer vs fla Mamba2.torch_forward", "B": B, "T": T, "max_diff": diff}
    for kind, grad in (("fwd", False), ("fwd+bwd", True)):
        res = time_methods({k: run(f, grad) for k, f in mamba.items()}, rounds=rounds, warmup=1)
        theirs, mine = res["fla Mamba2.torch_forward"].median_ms, res["recurra mamba2"].median_ms
        rec[kind] = {"fla_ms": theirs, "ours_ms": mine, "speedup": theirs / mine}
        goal = ">= 5x (fwd+bwd)" if grad else "(reported)"
        verdict = ("met" if theirs / mine >= 5 else "NOT met") if grad else "-"
        rows.append(["mamba2 layer vs fla Mamba2.torch_forward",
                     f"B={B} T={T} d=128 4x64 N=64", kind, theirs, mine, theirs / mine, goal,
                     verdict, f"{diff:.1e}"])
    records.append(rec)

    # ops: linear attention and scalar-decay (simple GLA == SSD with B=k, C=q, x=v)
    H, K = 4, 64
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, T, H, K, generator=g) for _ in range(3))
    gate = -torch.rand(B, T, H, generator=g) * 0.1
    scale = K ** -0.5
    qh, kh, vh = (a.transpose(1, 2).contiguous() for a in (q, k, v))   # our head-first layout

    def op_run(fn, tensors, grad):
        def call():
            leaves = [a.detach().requires_grad_(grad) for a in tensors]
            with torch.set_grad_enabled(grad):
                y = fn(*leaves)
                if grad:
                    y.sum().backward()
            return y
        return call

    cases = [
        ("linear attention (unnormalised)", "fla naive_chunk_linear_attn",
         lambda a, b, c: naive_chunk_linear_attn(a, b, c, scale=scale), (q, k, v),
         lambda a, b, c: linear_attention_chunked(a * scale, b, c, normalize=False)[0],
         (qh, kh, vh), lambda y: y.transpose(1, 2)),
        ("scalar-decay linear attention", "fla naive_chunk_simple_gla",
         lambda a, b, c, d: naive_chunk_simple_gla(a, b, c, d, scale=scale)[0], (q, k, v, gate),
         lambda a, b, c, d: ssd_chunked(c, d, b, a * scale)[0], (q, k, v, gate),
         lambda y: y),
    ]
    for what, fla_name, fla_fn, fla_in, our_fn, our_in, to_fla_layout in cases:
        diff = assert_same(op_run(fla_fn, fla_in, False)(),
                           to_fla_layout(op_run(our_fn, our_in, False)()), atol=1e-3, rtol=1e-3,
                           what=f"{what}: recurra vs {fla_name}")
        rec = {"what": f"{what} vs {fla_name}", "B": B, "T": T, "max_diff": diff}
        for kind, grad in (("fwd", False), ("fwd+bwd", True)):
            res = time_methods({"fla": op_run(fla_fn, fla_in, grad),
                                "ours": op_run(our_fn, our_in, grad)},
                               rounds=rounds, warmup=1, min_round_s=0.2)
            theirs, mine = res["fla"].median_ms, res["ours"].median_ms
            rec[kind] = {"fla_ms": theirs, "ours_ms": mine, "speedup": theirs / mine}
            goal = ">= 1x" if "unnormalised" in what else "(reported)"
            verdict = ("met" if theirs / mine >= 1 else "NOT met") if goal == ">= 1x" else "-"
            rows.append([f"{what} vs {fla_name}", f"B={B} T={T} H={H} d={K}", kind, theirs,
                         mine, theirs / mine, goal, verdict, f"{diff:.1e}"])
        records.append(rec)


def run(args) -> None:
    import torch

    from .harness import bar_chart, write_results

    torch.set_num_threads(args.threads)
    rows, records, mem_rows, mem_records = [], [], [], []
    if not args.only_fla:
        parallel_vs_step(args, rows, records)
    fla_ok = False
    if not args.skip_fla:
        fla_ok = _ensure_fla()
        if fla_ok:
            with held_lock(args.lock):
                versus_fla(args, rows, records)
    if not args.skip_memory and not args.only_fla:
        configs = {**{n: (n, o) for n, o in LAYERS.items()}, **MEMORY_EXTRA}
        configs = {k: configs[k] for k in selected(args.only, configs)}
        mem_rows, mem_records = step_memory(configs, args.quick, args.lock)

    notes = _verdict(rows, mem_records, args, fla_ok) + step_memory_table(mem_rows)
    header = ["comparison", "size", "pass", "baseline ms", "recurra ms", "speedup", "goal",
              "verdict", "max diff"]
    md = write_results(args.out, "Layer zoo: parallel forms vs step loops and fla (float32)",
                       _command(args), header, rows,
                       extra={"records": records, "memory": mem_records}, notes=notes)
    labels = [f"{r[0].split(' vs ')[0]} ({r[2]})" for r in rows]
    bar_chart(args.out + ".png", "Speedup of recurra's parallel form (log scale reference: 1x)",
              labels, {"speedup (baseline / recurra)": [r[5] for r in rows]}, "speedup",
              hline=1.0)
    print(md)


def _paths_note() -> str:
    """Which code the parallel rows ran (the layers' default backend="auto")."""
    from ..ops import chunked_scan_compiled

    reason = chunked_scan_compiled.EXTENSION.unavailable_reason()
    inference = ("the compiled inference kernels (recurra.ops.chunked_scan_compiled: the "
                 "chunked scan, and Mamba-2's conv + SiLU and gated RMSNorm)" if reason is None
                 else f"the torch ops (the compiled inference kernels are unavailable: {reason})")
    return ("Paths: the fwd rows run without gradients, so mamba2 and linear_attention take their "
            f"inference path, {inference}; the fwd+bwd rows, s4d and aaren run the torch ops; "
            "the step loops run each layer's `step`.")


def _verdict(rows, mem_records, args, fla_ok) -> str:
    lines = ["### Goals"]
    if args.quick:
        lines.append("QUICK RUN (tiny sizes): not a measurement of the goals.")
    for r in rows:
        if r[7] in ("met", "NOT met"):
            lines.append(f"- {r[0]} ({r[2]}): {r[5]:.1f}x, goal {r[6]}: **{r[7]}**")
    if not fla_ok:
        lines.append("- fla comparison: **not run** (skipped or fla unavailable)")
    lines += step_memory_verdicts(mem_records)
    lines.append("\n" + _paths_note())
    if args.lock:
        lines.append(f"\nTimed holding `{args.lock}` (flock) around each pass's timing (the "
                     "untimed equality check runs outside it), the fla section and each "
                     "layer's step-memory measurement.")
    return "\n".join(lines)
