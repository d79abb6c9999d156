"""Write the results of a grid: ``results.json``, ``results.md`` and one PNG per task spec."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

from .runner import write_json


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def plot_name(task: str) -> str:
    return "plot_" + re.sub(r"[^A-Za-z0-9_.=-]+", "-", task) + ".png"


def group_by_task(results: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Results per task spec; a task trained at several lengths gets one group per length
    (named ``task [train L]``)."""
    lengths: dict[str, set] = {}
    for r in results:
        lengths.setdefault(r["task"], set()).add(r.get("train_length"))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        key = r["task"]
        if len(lengths[key]) > 1:
            key = f"{key} [train {r.get('train_length')}]"
        groups.setdefault(key, []).append(r)
    return groups


def primary(result: dict[str, Any], length: str) -> float | None:
    if result.get("status") != "ok" or length not in result.get("accuracy", {}):
        return None
    return result["accuracy"][length][result["primary_metric"]]


def markdown(results: Sequence[dict[str, Any]], title: str, command: str,
             budget: dict[str, Any], machine: str = "",
             wall_seconds: float | None = None) -> str:
    lines = [f"## {title}", "", f"`{command}`", ""]
    if machine:
        lines += [f"Machine: {machine}.", ""]
    if wall_seconds is not None:
        reused = sum(1 for r in results if r.get("resumed"))
        computed = sum(r.get("seconds", 0) for r in results if not r.get("resumed"))
        lines += [(f"Wall-clock of this invocation: {wall_seconds / 60:.1f} min for "
                   f"{len(results) - reused} computed cell(s) ({reused} reused from earlier "
                   f"runs); sum of the computed cells' seconds: {computed:.0f} s."), ""]
    lines += [
        f"Budget `{budget['name']}`: d_model {budget['d_model']}, {budget['n_layers']} layer(s), "
        f"{budget['steps']} steps of batch {budget['batch_size']}, lr {budget['lr']}, "
        f"{budget['n_test']} test examples per length. Some tasks train for more steps "
        f"(the steps column; the suites size each task).",
        "",
        "Each cell is the task's primary metric at each test length (lengths marked * are longer "
        "than the training length); † = training stopped by the time cap.",
        "",
    ]
    failed = []
    for task, group in group_by_task(results).items():
        lengths = sorted({int(k) for r in group for k in (r.get("accuracy") or {})}
                         | {int(x) for r in group
                            for x in r.get("config", {}).get("cell", {}).get("test_lengths", [])})
        train = group[0].get("train_length")
        metric = next((r["primary_metric"] for r in group if r.get("status") == "ok"), "?")
        lines.append(f"### `{task}` (train length {train}, metric: {metric} accuracy)")
        lines.append("")
        head = ["model"] + [f"{n}*" if train is not None and n > train else str(n)
                            for n in lengths] + ["params", "steps", "train s"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for r in group:
            name = f"`{r['model']}`" + (" †" if r.get("time_capped") else "")
            if r.get("status") != "ok":
                failed.append(r)
                lines.append("| " + " | ".join([name] + ["failed"] * len(lengths) + ["", "", ""])
                             + " |")
                continue
            row = [name] + [_fmt(primary(r, str(n))) for n in lengths]
            row += [str(r.get("n_params", "")), str(r.get("steps_done", "")),
                    f"{r.get('train_seconds', 0):.0f}"]
            lines.append("| " + " | ".join(row) + " |")
        lines += ["", f"![{task}]({plot_name(task)})", ""]
    if failed:
        lines += ["### Failed cells", ""]
        for r in failed:
            lines.append(f"- `{r['task']}` × `{r['model']}`: {r.get('error', '?')}")
        lines.append("")
    return "\n".join(lines)


def plot_task(path: str, task: str, group: Sequence[dict[str, Any]]) -> None:
    from ..bench.harness import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    train = group[0].get("train_length")
    metric = "?"
    for r in group:
        if r.get("status") != "ok":
            continue
        metric = r["primary_metric"]
        xs = sorted(int(k) for k in r["accuracy"])
        ax.plot(xs, [r["accuracy"][str(x)][metric] for x in xs], marker="o", label=r["model"])
    if train is not None:
        ax.axvline(train, color="k", linestyle="--", linewidth=1, label="train length")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("test length")
    ax.set_ylabel(f"{metric} accuracy")
    ax.set_title(task, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: str, results: Sequence[dict[str, Any]], title: str, command: str,
                 budget: dict[str, Any], plots: bool = True,
                 wall_seconds: float | None = None) -> dict[str, str]:
    """Write results.json, results.md and the plots; returns the paths.

    ``wall_seconds``: the wall-clock time of the invocation, recorded in both files.
    """
    from ..bench.harness import machine_info

    info = machine_info()
    machine = f"{info['cpu']}, torch {info['torch']}, {info['threads']} threads"
    paths = {"json": os.path.join(out_dir, "results.json"),
             "markdown": os.path.join(out_dir, "results.md")}
    write_json(paths["json"], {"title": title, "command": command, "budget": budget,
                               "machine": info, "wall_seconds": wall_seconds,
                               "cells": list(results)})
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results, title, command, budget, machine, wall_seconds))
    if plots:
        for task, group in group_by_task(results).items():
            path = os.path.join(out_dir, plot_name(task))
            plot_task(path, task, group)
            paths[task] = path
    return paths
