"""The `chipfuse` command. Each subcommand lives in chipfuse/commands/<name>.py and exposes
`register(subparsers)`, so commands can be added without touching this file's logic."""

from __future__ import annotations

import argparse
import importlib
import sys

from chipfuse.errors import ChipfuseError

COMMANDS = ("pool", "train", "plan", "profile", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chipfuse", description="Train one model across unequal chips.")
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
        print(f"chipfuse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
