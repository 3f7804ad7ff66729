"""Run a function on N gloo ranks over 127.0.0.1, for tests (torch.multiprocessing spawn)."""

from __future__ import annotations

import io
import os
import socket
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, queue) -> None:  # type: ignore[no-untyped-def]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        buf = io.BytesIO()
        # Bytes, not tensors: tensors sent through a queue live in shared memory that vanishes
        # when this process exits before the parent reads them.
        torch.save(fn(rank, world, *args), buf)
        queue.put((rank, buf.getvalue(), None))
    except Exception:
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world: int, *args):  # type: ignore[no-untyped-def]
    """fn(rank, world, *args) on `world` ranks; returns the list of results by rank, or raises the
    first rank's error. fn must be a module-level function (it is pickled)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    for _ in range(world):
        rank, res, err = queue.get(timeout=240)
        if err:
            errors.append(f"rank {rank}:\n{err}")
        results[rank] = torch.load(io.BytesIO(res), weights_only=False) if res is not None else None
    for p in procs:
        p.join(timeout=30)
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world)]
