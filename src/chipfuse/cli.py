"""The `chipfuse` command. Each subcommand lives in chipfuse/commands/<name>.py and exposes
`register(subparsers)`, so commands can be added without touching this file's logic."""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Callable
from typing import NoReturn

import torch
import torch.distributed as dist

from chipfuse.errors import ChipfuseError, DeviceMemoryError
from chipfuse.validate import one_line

COMMANDS = ("pool", "train", "plan", "profile", "data", "export", "generate", "serve")


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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # a bad flag (one line already printed) or --help: an exit code, not an exit
        return e.code if isinstance(e.code, int) else 2
    return guarded(lambda: args.func(args), args)


def guarded(call: Callable[[], int | None], args: argparse.Namespace) -> int:
    """Run `call`, turning a user error, a device past its memory or a lost peer into one line and an
    exit code: for a command (`main`) and for a worker loaded from its run spec alike."""
    try:
        return int(call() or 0)
    except ChipfuseError as e:
        print(f"chipfuse: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except (RuntimeError, dist.DistError) as e:
        inner = chipfuse_cause(e)
        if inner is not None:  # torch.distributed.pipelining wraps a stage's error in a RuntimeError
            print(f"chipfuse: error: {one_line(str(inner))}", file=sys.stderr)
            return 2
        lost = lost_peer(e)
        if lost is None:
            raise
        ckpt = getattr(args, "checkpoint_dir", None)
        print(f"chipfuse: error: lost contact with another worker during a collective ({lost}){_links(args)}: "
              f"the link or the worker is down. Fix: restore the link or the host, then resume with `chipfuse train "
              f"--resume {ckpt or 'CHECKPOINT_DIR'}`" + ("" if ckpt else " (this run wrote no checkpoints: "
                                                          "start with --checkpoint-dir next time)"),
              file=sys.stderr, flush=True)
        return 3
    except OSError as e:  # a path given on the command line that cannot be read or written
        print(f"chipfuse: error: {e.filename or ''}: {e.strerror or e}. Fix: check the path and its permissions",
              file=sys.stderr)
        return 2


def _links(args: argparse.Namespace) -> str:
    """On several hosts (--pool-node): the pool's links from this node, to name the suspects."""
    node, pool_path = getattr(args, "pool_node", None), getattr(args, "pool", None)
    if not node or not pool_path:
        return ""
    try:
        from chipfuse.cluster.pool import load_pool

        others = [n.name for n in load_pool(pool_path).nodes if n.name != node]
    except ChipfuseError:
        return ""
    return f" on node {node!r}; suspect link(s): " + ", ".join(f"{node} <-> {o}" for o in others)


def chipfuse_cause(e: BaseException) -> Exception | None:
    """The user-facing error (bad input, or a device past its memory cap) that `e` was raised from,
    if any: a library (torch.distributed.pipelining) re-raises it wrapped."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (ChipfuseError, DeviceMemoryError)):
            return cur
        if isinstance(cur, torch.OutOfMemoryError):
            return DeviceMemoryError(f"{one_line(str(cur))[:300]}. Fix: give this device a smaller share or "
                                     "micro-batch, turn on activation checkpointing or sharding in the plan, or let "
                                     "`chipfuse plan` choose a plan that fits")
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def lost_peer(e: BaseException) -> str | None:
    """The peer and the cause, when `e` is a collective that failed because a peer or the link
    to it went away (gloo's timeout or a reset connection); None for any other error."""
    text = str(e)
    causes = ("Timed out waiting", "Connection reset", "Connection closed", "Connection refused", "Broken pipe",
              "No route to host", "Socket Timeout", "timed out")
    cause = next((c for c in causes if c.lower() in text.lower()), None)
    if cause is None or not any(k in text.lower() for k in ("gloo", "pair", "recv", "send", "collective", "[")):
        return None
    peer = re.search(r"\[([0-9a-fA-F.:]+)\]:(\d+)", text)
    return f"{cause.lower()}" + (f", peer {peer.group(1)}:{peer.group(2)}" if peer else "")


if __name__ == "__main__":
    sys.exit(main())
