"""``recurra bench SUITE``: speed benchmarks; each suite is a module of ``recurra.bench``.

A suite module defines ``DESCRIPTION`` (one line), ``add_arguments(parser)`` and ``run(args)``,
and writes a markdown table and a PNG chart (see ``recurra.bench.harness``).
"""

from __future__ import annotations

import importlib
import pkgutil

_NOT_SUITES = {"harness"}


def suites() -> list[str]:
    """Modules of recurra.bench that define a suite (DESCRIPTION, add_arguments, run); other
    modules there are helpers shared by suites."""
    package = importlib.import_module("recurra.bench")
    names = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_") or info.name in _NOT_SUITES:
            continue
        module = importlib.import_module(f"recurra.bench.{info.name}")
        if all(hasattr(module, a) for a in ("DESCRIPTION", "add_arguments", "run")):
            names.append(info.name)
    return sorted(names)


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="run a speed benchmark suite (table + PNG chart)")
    inner = parser.add_subparsers(dest="suite", metavar="SUITE", required=True)
    for name in suites():
        module = importlib.import_module(f"recurra.bench.{name}")
        p = inner.add_parser(name, help=module.DESCRIPTION)
        p.add_argument("--out", default=f"benchmarks/results/{name}",
                       help="output prefix: writes OUT.md, OUT.json and OUT.png")
        p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
        module.add_arguments(p)
        p.set_defaults(func=module.run)
