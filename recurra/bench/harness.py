"""Shared benchmark machinery: fair side-by-side timing, tables and charts.

Rules every suite follows (see BENCHMARKS.md):
- all methods of one comparison are timed in one process, interleaved: each round runs every
  method once, in an order rotated from round to round, after warm-up rounds;
- we report the median and the inter-quartile range over rounds, and ratios of medians;
- outputs are checked equal (``assert_same``) before anything is timed.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    rounds: int


def time_methods(
    methods: dict[str, Callable[[], Any]], rounds: int = 7, warmup: int = 2,
    min_round_s: float = 0.0,
) -> dict[str, Timing]:
    """Time each callable; rounds interleave the methods in a rotating order.

    ``min_round_s`` repeats a method inside a round until that much time passed (for very fast
    methods); the reported time is per call.
    """
    names = list(methods)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            fn = methods[name]
            calls = 0
            start = time.perf_counter()
            while True:
                fn()
                calls += 1
                elapsed = time.perf_counter() - start
                if elapsed >= min_round_s:
                    break
            if r >= warmup:
                samples[name].append(1e3 * elapsed / calls)
    out = {}
    for name, xs in samples.items():
        xs = sorted(xs)
        q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
        out[name] = Timing(statistics.median(xs), q[0], q[2], len(xs))
    return out


def assert_same(reference: torch.Tensor, other: torch.Tensor, atol: float, rtol: float,
                what: str) -> float:
    """Raise if two outputs differ beyond tolerance (a speedup is never reported on a mismatch).

    Returns the max absolute difference.
    """
    diff = (reference.double() - other.double()).abs()
    bound = atol + rtol * reference.double().abs()
    if not bool((diff <= bound).all()):
        raise AssertionError(f"{what}: outputs differ (max abs diff {diff.max().item():.3g})")
    return diff.max().item()


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(out_prefix: str, title: str, command: str, header: list[str],
                  rows: list[list[Any]], extra: dict[str, Any] | None = None,
                  notes: str = "") -> str:
    """Write OUT.md (table + command + machine) and OUT.json; returns the markdown."""
    os.makedirs(os.path.dirname(out_prefix) or ".", exist_ok=True)
    info = machine_info()
    md = (
        f"## {title}\n\n`{command}`\n\n"
        f"Machine: {info['cpu']}, torch {info['torch']}, {info['threads']} threads.\n\n"
        + markdown_table(header, rows) + "\n"
        + (f"\n{notes}\n" if notes else "")
        + f"\n![{title}]({os.path.basename(out_prefix)}.png)\n"
    )
    with open(out_prefix + ".md", "w") as f:
        f.write(md)
    with open(out_prefix + ".json", "w") as f:
        json.dump({"title": title, "command": command, "machine": info, "header": header,
                   "rows": rows, **(extra or {})}, f, indent=1, default=_jsonable)
    return md


def _jsonable(v):
    if isinstance(v, Timing):
        return asdict(v)
    return str(v)


def pyplot():
    """matplotlib's pyplot with a file-only backend; a clear error when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("charts need matplotlib: pip install 'recurra[plot]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(path: str, title: str, labels: list[str], series: dict[str, list[float]],
              ylabel: str, hline: float | None = None) -> None:
    """Grouped bar chart: one group per label, one bar per series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(labels) + 2), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, values, width=width, label=name)
    if hline is not None:
        ax.axhline(hline, color="k", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    # beside the axes: inside, a long legend hides bars
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def line_chart(path: str, title: str, xs: list[float], series: dict[str, list[float]],
               xlabel: str, ylabel: str, logx: bool = True, logy: bool = True) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, ys in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rss_bytes() -> int:
    """Resident memory of this process (Linux /proc), in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_step_memory(layer, d_model: int, position: int, steps: int = 256) -> dict[str, float]:
    """Memory of step-mode generation after ``position`` tokens.

    Prefills ``position`` random inputs in pieces (only the state is carried), then runs
    ``steps`` single steps. Returns the state's size in bytes, the resident-memory growth over
    those steps and the time per step: constant-memory layers show the same state size and no
    growth at every position.
    """
    with torch.no_grad():
        state = layer.init_state(1)
        done = 0
        while done < position:
            n = min(4096, position - done)
            _, state = layer(torch.randn(1, n, d_model), state)
            done += n
        state_bytes = sum(s.numel() * s.element_size() for s in state)
        x_t = torch.randn(1, d_model)
        for _ in range(16):  # warm the allocator at this position
            _, state = layer.step(x_t, state)
        rss0 = rss_bytes()
        t0 = time.perf_counter()
        for _ in range(steps):
            _, state = layer.step(x_t, state)
        step_ms = 1e3 * (time.perf_counter() - t0) / steps
        growth = rss_bytes() - rss0
    return {"T": position, "state_bytes": state_bytes, "rss_growth": growth, "step_ms": step_ms}
