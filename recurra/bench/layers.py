"""``recurra bench layers``: the classic cells against torch.nn and FlashRNN's CPU backends.

Three comparisons, each timed side by side in one process (interleaved, rotated, medians):
1. ``lstm`` / ``gru`` / ``elman`` vs torch.nn.LSTM / GRU / RNN at (B, T, H) = (32, 512, 256),
   (8, 1024, 512), (1, 4096, 64); input size H. Goals: lstm >= 0.95x torch's speed; gru and
   elman >= 1.5x torch's forward+backward speed.
2. multi-head ``lstm`` and ``slstm`` (hidden 256 as heads x head size 1x256, 4x64, 16x16;
   B=16, T=512) vs FlashRNN's pure-PyTorch backends ``vanilla`` and ``vanilla_fwbw`` (installed
   into the environment by this command with ``pip install --no-deps flashrnn`` when missing),
   input projection included on both sides. Goal: >= 1.5x FlashRNN's best CPU backend,
   forward+backward.
3. the fraction of this CPU's measured float32 matmul peak each layer reaches.
Outputs are checked equal (forward output and input gradient) before anything is timed.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import time

DESCRIPTION = "classic cells vs torch.nn.LSTM/GRU/RNN and FlashRNN's CPU backends"

TORCH_SIZES = [(32, 512, 256), (8, 1024, 512), (1, 4096, 64)]
HEAD_SPLITS = [(1, 256), (4, 64), (16, 16)]


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and few rounds (a smoke run, not a measurement)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per method (at least)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="add rounds until each method has run about this long (short "
                             "configurations get more samples; at most 101 rounds)")
    parser.add_argument("--skip-flashrnn", action="store_true",
                        help="skip the FlashRNN comparison (no install attempted)")


def matmul_peak_gflops(n: int = 1024, seconds: float = 1.0) -> float:
    """Measured float32 GEMM throughput of torch.mm at n x n (best of a few)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def layer_flops(cell: str, B: int, T: int, I: int, H: int, heads: int, backward: bool) -> float:
    """Matmul FLOPs of one layer: input projection + recurrent products (x3 with backward)."""
    G = {"lstm": 4, "gru": 3, "elman": 1, "slstm": 4}[cell]
    fwd = 2 * B * T * G * H * (I + H // heads)
    return 3 * fwd if backward else fwd


def _timed_pair(make_ours, make_theirs, x, backward: bool, rounds: int,
                min_seconds: float = 0.0):
    """Check both give the same output (and input gradient), then time them interleaved.

    The rounds grow until each method has run about ``min_seconds`` in all (at most 101), so
    short calls, whose times vary most, get more samples.
    """
    import time

    import torch

    from .harness import assert_same, time_methods

    def run(fn):
        if backward:
            xg = x.detach().requires_grad_(True)
            y = fn(xg)
            y.sum().backward()
            return y.detach(), xg.grad
        with torch.no_grad():
            return fn(x), None

    start = time.perf_counter()
    ya, ga = run(make_ours)
    once = time.perf_counter() - start
    rounds = max(rounds, min(101, int(min_seconds / max(once, 1e-6))))
    for name, their in make_theirs.items():
        yb, gb = run(their)
        assert_same(yb, ya, atol=1e-4, rtol=1e-3, what=f"{name} output")
        if backward:
            assert_same(gb, ga, atol=1e-4, rtol=1e-3, what=f"{name} input gradient")
    methods = {"recurra": lambda: run(make_ours), **{k: (lambda f=f: run(f)) for k, f in
                                                      make_theirs.items()}}
    return time_methods(methods, rounds=rounds, warmup=1)


def _ensure_flashrnn() -> bool:
    try:
        importlib.import_module("flashrnn")
        return True
    except ImportError:
        pass
    print("installing flashrnn (benchmark only): pip install --no-deps flashrnn einops")
    code = subprocess.call([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "flashrnn", "einops"])
    if code:
        return False
    importlib.invalidate_caches()
    try:
        importlib.import_module("flashrnn")
        return True
    except ImportError:
        return False


def run(args) -> int:
    import torch
    from torch import nn

    import recurra.layers as L

    from .harness import bar_chart, write_results

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rounds = 2 if args.quick else args.rounds
    min_s = 0.0 if args.quick else args.min_seconds
    sizes = [(4, 32, 16), (1, 64, 8)] if args.quick else TORCH_SIZES
    splits = [(1, 16), (4, 4)] if args.quick else HEAD_SPLITS
    BH, BB, BT = (16, 4, 32) if args.quick else (256, 16, 512)
    peak = matmul_peak_gflops(256 if args.quick else 1024, 0.2 if args.quick else 1.0)
    print(f"float32 matmul peak (torch.mm): {peak:.0f} GFLOP/s")
    rows, labels, ratio_f, ratio_fb = [], [], [], []

    torch_cls = {"lstm": nn.LSTM, "gru": nn.GRU, "elman": nn.RNN}
    goals = {"lstm": 0.95, "gru": 1.5, "elman": 1.5}
    for cell, cls in torch_cls.items():
        for (B, T, H) in sizes:
            ref = cls(H, H, batch_first=True)
            ours = L.from_torch(ref)
            x = torch.randn(B, T, H)
            label = f"{cell} B{B} T{T} H{H}"
            res = {}
            for backward in (False, True):
                t = _timed_pair(lambda v, m=ours: m(v)[0], {"torch.nn": lambda v, m=ref: m(v)[0]}, x,
                                backward, rounds, min_s)
                res[backward] = t
            r_f = res[False]["torch.nn"].median_ms / res[False]["recurra"].median_ms
            r_fb = res[True]["torch.nn"].median_ms / res[True]["recurra"].median_ms
            fl = layer_flops(cell, B, T, H, H, 1, True)
            goal = goals[cell]
            met = (min(r_f, r_fb) >= goal) if cell == "lstm" else (r_fb >= goal)
            rows.append([label, f"torch.nn.{cls.__name__}", ours.resolved_backend(B),
                         res[False]["recurra"].median_ms, res[False]["torch.nn"].median_ms,
                         r_f, res[True]["recurra"].median_ms, res[True]["torch.nn"].median_ms,
                         r_fb, 100 * fl / (res[True]["recurra"].median_ms * 1e6) / peak,
                         f">= {goal}x {'met' if met else 'NOT met'}"])
            labels.append(label)
            ratio_f.append(r_f)
            ratio_fb.append(r_fb)
            print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.3g}"
                             for v in rows[-1]))

    if not args.skip_flashrnn and _ensure_flashrnn():
        from flashrnn import flashrnn

        for cell in ("lstm", "slstm"):
            for heads, dh in splits:
                layer = L.build(cell, BH, num_heads=heads)
                x = torch.randn(BB, BT, BH)
                G = 4
                w_ih, w_hh = layer.weight_ih_l0, layer.weight_hh_l0
                b = (layer.bias_ih_l0 + layer.bias_hh_l0).view(G, heads, dh)

                def theirs(v, backend, w_ih=w_ih, w_hh=w_hh, b=b, heads=heads, dh=dh,
                           cell=cell, G=G):
                    wx = (v @ w_ih.T).view(v.shape[0], v.shape[1], G, heads, dh)
                    out, _ = flashrnn(wx, w_hh.view(G, heads, dh, dh), b, function=cell,
                                      backend=backend, dtype="float32")
                    return out[0].reshape(v.shape[0], v.shape[1], -1)

                label = f"{cell} {heads}x{dh} B{BB} T{BT}"
                res = {}
                for backward in (False, True):
                    res[backward] = _timed_pair(
                        lambda v, m=layer: m(v)[0],
                        {"flashrnn vanilla": lambda v: theirs(v, "vanilla"),
                         "flashrnn vanilla_fwbw": lambda v: theirs(v, "vanilla_fwbw")},
                        x, backward, rounds, min_s)
                best_f = min(res[False]["flashrnn vanilla"].median_ms,
                             res[False]["flashrnn vanilla_fwbw"].median_ms)
                best_fb = min(res[True]["flashrnn vanilla"].median_ms,
                              res[True]["flashrnn vanilla_fwbw"].median_ms)
                r_f = best_f / res[False]["recurra"].median_ms
                r_fb = best_fb / res[True]["recurra"].median_ms
                fl = layer_flops(cell, BB, BT, BH, BH, heads, True)
                rows.append([label, "flashrnn best of vanilla / vanilla_fwbw", layer.resolved_backend(BB),
                             res[False]["recurra"].median_ms, best_f, r_f,
                             res[True]["recurra"].median_ms, best_fb, r_fb,
                             100 * fl / (res[True]["recurra"].median_ms * 1e6) / peak,
                             f">= 1.5x {'met' if r_fb >= 1.5 else 'NOT met'}"])
                labels.append(label)
                ratio_f.append(r_f)
                ratio_fb.append(r_fb)
                print(" | ".join(str(v) if not isinstance(v, float) else f"{v:.3g}"
                                 for v in rows[-1]))
    elif not args.skip_flashrnn:
        print("flashrnn could not be installed: FlashRNN comparison skipped")

    header = ["config", "baseline", "recurra backend", "recurra fwd ms", "baseline fwd ms",
              "speed-up fwd", "recurra f+b ms", "baseline f+b ms", "speed-up f+b",
              "% of matmul peak (f+b)", "goal (f+b)"]
    command = "recurra bench layers" + (" --quick" if args.quick else "") + \
        f" --threads {args.threads}"
    md = write_results(
        args.out, "Classic recurrent layers vs torch.nn and FlashRNN (float32, CPU)", command,
        header, rows, extra={"matmul_peak_gflops": peak},
        notes=(f"Speed-up = baseline time / recurra time (> 1: recurra is faster). "
               f"Measured float32 matmul peak: {peak:.0f} GFLOP/s (torch.mm 1024^2). "
               "lstm's goal (>= 0.95x) applies to forward and forward+backward; the other "
               "goals to forward+backward."))
    bar_chart(args.out + ".png", "recurra speed-up over the baseline (higher is better)",
              labels, {"forward": ratio_f, "forward+backward": ratio_fb}, "speed-up (x)",
              hline=1.0)
    print(md)
    return 0
