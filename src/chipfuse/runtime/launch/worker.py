"""The one worker entry: load the run spec the launcher wrote, train, hand rank 0's summary back.

    python -m chipfuse.runtime.launch.worker RUN_DIR/runspec.json [--resume DIR]

Every launch path starts this: torchrun (one process per device), the supervisor (again after a
lost device, with the survivors' spec), and the launcher itself, in its own process, for one
device. No command-line parsing, planning or plan checks happen here: the spec is what the
launcher resolved and checked once. The worker still validates its ranks (Topology.check in the
trainer): only the running job knows its world size and which worker took which device."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace

from chipfuse.errors import ChipfuseError
from chipfuse.runtime.launch import dist as cfdist
from chipfuse.runtime.launch.runspec import RunSpec


def run_worker(spec: RunSpec, *, device: str | None = None) -> dict | None:
    """Train this rank's part of `spec`. Rank 0 returns the raw summary (and writes it to
    spec.result_path for a launcher in another process); other ranks return None."""
    from chipfuse.runtime.train.trainer import run

    cfg = replace(spec.train, device=device) if device else spec.train
    summary = run(spec.plan, spec.pool(), cfg)
    if summary is not None:
        spec.result_path.parent.mkdir(parents=True, exist_ok=True)
        spec.result_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def with_resume(spec: RunSpec, resume: str | None) -> RunSpec:
    """The spec of a relaunch: the same run, continued from the checkpoint directory `resume`."""
    return replace(spec, train=replace(spec.train, endure=replace(spec.train.endure, resume=resume)))


def main(argv: list[str]) -> int:
    if len(argv) not in (1, 3) or (len(argv) == 3 and argv[1] != "--resume"):
        print("usage: python -m chipfuse.runtime.launch.worker RUNSPEC.json [--resume DIR]", file=sys.stderr)
        return 2
    from chipfuse.cli import guarded

    try:
        spec = RunSpec.load(argv[0])
    except ChipfuseError as e:
        print(f"chipfuse: error: {e}", file=sys.stderr)
        return 2
    if len(argv) == 3:
        spec = with_resume(spec, argv[2])
    # What the error lines name: the checkpoint to resume from, the pool's links.
    where = argparse.Namespace(checkpoint_dir=spec.train.endure.checkpoint_dir, pool=spec.pool_source, pool_node=None)

    def train() -> None:
        run_worker(spec)

    rc = guarded(train, where)
    if rc == 0 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        cfdist.shutdown(exit_code=0)  # hard exit after leaving the group: gloo can abort at interpreter exit
    cfdist.shutdown()
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

