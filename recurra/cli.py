"""The ``recurra`` command.

Each subcommand lives in its own module of ``recurra.commands`` that defines
``register(subparsers)``; adding a file there adds a subcommand. Modules keep heavy imports
(torch) inside their run functions so ``recurra --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recurra", description="Recurrent sequence models: train, sample, evaluate, bench."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    package = importlib.import_module("recurra.commands")
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"recurra.commands.{info.name}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code = args.func(args)
    return int(code or 0)


if __name__ == "__main__":
    sys.exit(main())
