"""`codefoundry` command line: one entry point, one subcommand per pipeline stage.

Each stage module exposes ``register(subparsers)`` which adds its parser(s) and sets
``func`` to the function that runs it; this file only wires them together and turns
:class:`UserError` into a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from codefoundry.errors import UserError
from codefoundry.extras import missing_message

# Stage modules, in pipeline order. Each has register(subparsers).
COMMAND_MODULES = [
    "codefoundry.tokenizer.cli",
    "codefoundry.data.cli",
    "codefoundry.train.cli",
    "codefoundry.eval.cli",
    "codefoundry.infer.cli",
    "codefoundry.post.cli",
    "codefoundry.export.cli",
    "codefoundry.speedrun",
    "codefoundry.recipe_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codefoundry", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"codefoundry {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional dependency the command imports lazily
        if (message := missing_message(exc.name)) is None:
            raise
        print(f"codefoundry {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"codefoundry {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
