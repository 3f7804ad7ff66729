"""The `chipfuse` command. Each subcommand lives in chipfuse/commands/<name>.py and exposes
`register(subparsers)`, so commands can be added without touching this file's logic."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NoReturn

from chipfuse.errors import ChipfuseError
from chipfuse.validate import one_line

COMMANDS = ("pool", "train", "plan", "profile")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag or value ends in one line (the usage is what `--help` is for)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {one_line(message)}. Fix: see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="chipfuse", description="Train one model across unequal chips.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        try:
            mod = importlib.import_module(f"chipfuse.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"chipfuse.commands.{name}":
                continue  # not built yet
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ChipfuseError as e:
        print(f"chipfuse: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given on the command line that cannot be read or written
        print(f"chipfuse: error: {e.filename or ''}: {e.strerror or e}. Fix: check the path and its permissions",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
