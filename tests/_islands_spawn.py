"""Run a function on a few gloo ranks over 127.0.0.1 and bring each rank's result back.

Results travel through files, and assertions run in the test process: a rank that failed an
assertion mid-collective would leave the others waiting for it.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` spawned ranks; returns their results by rank."""
    port = free_port()
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(fn, world_size, port, d, args), nprocs=world_size, join=True)
        return [torch.load(os.path.join(d, f"{r}.pt"), weights_only=False) for r in range(world_size)]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from chipfuse.runtime import dist as cdist

    cdist.init(timeout_s=60)
    out = fn(rank, world_size, *args)
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    cdist.shutdown(exit_code=0)
