"""``recurra layers``: the registered recurrent layers, one line each."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("layers", help="list the registered recurrent layers")
    parser.set_defaults(func=run)


def run(args) -> int:
    from recurra.layers import describe

    entries = describe()
    width = max((len(name) for name in entries), default=0)
    for name, description in entries.items():
        print(f"{name:<{width}}  {description}")
    return 0
