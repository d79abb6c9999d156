"""``recurra eval``: train small models on synthetic tasks and test them against length.

Examples::

    recurra eval                                   # the default suite, budget "small"
    recurra eval --suite state_tracking --budget full
    recurra eval --tasks parity s5 --layers lstm mamba2 --budget small
    recurra eval --tasks set_disjointness:order=long_first --layers gru,jrt

Writes OUT/results.json, OUT/results.md, OUT/plot_<task>.png and one file per cell under
OUT/cells/ (a rerun with the same OUT skips finished cells; ``--no-resume`` recomputes).
"""

from __future__ import annotations

import shlex
import sys


def _split(items):
    out = []
    for item in items or []:
        out += [x for x in item.split(",") if x]
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="train small models per (layer, task) and test accuracy against length")
    p.add_argument("--suite", default="default",
                   help="named experiment (default, state_tracking, jrt, stuffed_mamba, "
                        "length_generalisation, smoke); ignored when --tasks is given")
    p.add_argument("--tasks", nargs="+", help="task specs (name[:option=value...]), space or "
                   "comma separated; see --list")
    p.add_argument("--layers", nargs="+", help="model specs: registered layer names or "
                   "'transformer', with options name:option=value[@test_option=value]")
    p.add_argument("--budget", default="small", choices=("smoke", "small", "full"))
    p.add_argument("--out", default=None,
                   help="output folder (default benchmarks/results/eval/<suite or grid>-<budget>)")
    p.add_argument("--steps", type=int, default=None,
                   help="override the budget's number of training steps")
    p.add_argument("--time-cap", type=float, default=None,
                   help="override the budget's training time cap per cell in seconds (0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-length", type=int, default=None,
                   help="training length for --tasks grids (default: each task's own)")
    p.add_argument("--test-lengths", type=int, nargs="+", default=None,
                   help="test lengths for --tasks grids (default: each task's own)")
    p.add_argument("--no-resume", action="store_true", help="recompute finished cells too")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--list", action="store_true", help="list tasks, layers and suites, then exit")
    p.set_defaults(func=run)


def run(args) -> int:
    import time
    from dataclasses import replace

    import torch

    from ..evaluation.report import write_report
    from ..evaluation.runner import run_cells
    from ..evaluation.specs import BUDGETS
    from ..evaluation.suites import SUITES, grid_cells, suite_cells

    if args.list:
        from ..layers import describe as layer_describe
        from ..tasks.registry import describe as task_describe

        print("tasks:")
        for name, text in task_describe().items():
            print(f"  {name:18s} {text}")
        print("layers (plus 'transformer'):")
        for name, text in layer_describe().items():
            print(f"  {name:18s} {text}")
        print("suites: " + ", ".join(SUITES))
        return 0
    torch.set_num_threads(args.threads)
    budget = BUDGETS[args.budget]
    if args.steps is not None:
        if args.steps < 1:
            print("error: --steps must be >= 1", file=sys.stderr)
            return 2
        budget = replace(budget, name=f"{budget.name}-steps{args.steps}", steps=args.steps)
    if args.time_cap is not None:
        if args.time_cap < 0:
            print("error: --time-cap must be >= 0", file=sys.stderr)
            return 2
        budget = replace(budget, max_train_seconds=args.time_cap)
    tasks, layers = _split(args.tasks), _split(args.layers)
    if tasks:
        if not layers:
            print("error: --tasks needs --layers", file=sys.stderr)
            return 2
        cells = grid_cells(tasks, layers, args.seed, args.train_length, args.test_lengths)
        name = "grid"
    else:
        cells = suite_cells(args.suite, args.seed, args.budget)
        # --steps / --time-cap given on the command line win over a suite's per-task sizes
        drop = {k for k, given in (("steps", args.steps), ("max_train_seconds", args.time_cap))
                if given is not None}
        if drop:
            cells = [replace(c, overrides=tuple(o for o in c.overrides if o[0] not in drop))
                     for c in cells]
        if layers:
            wanted = set(layers)
            cells = [c for c in cells if c.model in wanted or c.model.split(":")[0] in wanted]
        name = args.suite
    out = args.out or f"benchmarks/results/eval/{name}-{budget.name}"
    argv = sys.argv[1:]
    command = "recurra " + " ".join(shlex.quote(a) for a in argv) \
        if argv[:1] == ["eval"] else "recurra eval"
    from dataclasses import asdict

    title = f"recurra eval: {name} ({budget.name})"

    def refresh(partial):  # keep results.md/json current while the grid runs
        write_report(out, partial, title + " [in progress]", command, asdict(budget), plots=False)

    start = time.perf_counter()
    results = run_cells(cells, budget, out, resume=not args.no_resume,
                        log=lambda m: print(m, file=sys.stderr), on_cell=refresh)
    wall = time.perf_counter() - start
    paths = write_report(out, results, title, command,
                         asdict(budget), plots=not args.no_plots, wall_seconds=round(wall, 1))
    failed = [r for r in results if r.get("status") != "ok"]
    print(f"{len(results) - len(failed)} cells ok, {len(failed)} failed, "
          f"{wall / 60:.1f} min; results in {paths['markdown']}")
    return 0
