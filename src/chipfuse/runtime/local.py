"""Run a function on N local ranks (spawned processes on gloo over 127.0.0.1) and collect results.

For tests and benchmarks; real jobs start under torchrun. Each rank writes its result with
torch.save into a temporary folder, because mp.spawn returns nothing, and exits hard after
leaving the group (dist.shutdown: gloo sometimes aborts at interpreter exit otherwise).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from chipfuse.runtime import dist as cdist

    cdist.init()
    code = 0
    try:
        torch.save(fn(rank, world, *args), Path(out) / f"rank{rank}.pt")
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    if code:
        os._exit(code)  # a failed rank must not wait in the exit barrier for the others
    cdist.shutdown(exit_code=0)


def spawn(fn: Callable[..., Any], world: int, *args: Any) -> list[Any]:
    """fn(rank, world, *args) on `world` ranks; returns each rank's return value, by rank."""
    with tempfile.TemporaryDirectory(prefix="chipfuse-spawn-") as out:
        mp.start_processes(_entry, args=(fn, world, free_port(), out, args), nprocs=world,
                           join=True, start_method="spawn")
        return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]
