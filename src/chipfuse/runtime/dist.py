"""Process-group set-up that works the same under torchrun and as a single process."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("RANK", -1)) != -1


def torch_device_kind(device: object) -> str:
    """'cuda' for a real (not emulated) NVIDIA/AMD device when this host has CUDA, else 'cpu'.
    Emulated devices always run on the CPU: their speed is rehearsed, not real."""
    emulated = getattr(device, "emulated", True)
    vendor = getattr(device, "vendor", "cpu")
    return "cuda" if not emulated and vendor in ("nvidia", "amd") and torch.cuda.is_available() else "cpu"


def collective_timeout(default_s: float = 60.0) -> datetime.timedelta:
    """How long any collective waits before giving up (a link down, a peer hung): the run then
    stops, named, instead of waiting forever (docs/endure.md). Give it to every group created
    (`dist.new_group` does not inherit the default group's timeout). Tests shorten it with
    CHIPFUSE_COLLECTIVE_TIMEOUT_S."""
    return datetime.timedelta(seconds=float(os.environ.get("CHIPFUSE_COLLECTIVE_TIMEOUT_S", default_s)))


def init(*, device_kind: str = "cpu", backend: str | None = None, timeout_s: float = 60.0,
         threads: int | None = 1) -> DistInfo:
    """Join the job. With no RANK in the environment this is a one-process job (no group).

    `threads=1`: every emulated worker uses one thread, else workers fight for the cores and
    the speed ratios they should show invert (shared/notes/torch-on-cpu.md).
    """
    if threads:
        torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if device_kind == "cuda":
        device = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(device)
    # NCCL only when every rank is a CUDA device; a fused CPU+GPU job talks gloo over host memory.
    be = backend or ("nccl" if device.type == "cuda" else "gloo")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(be, timeout=collective_timeout(timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local, backend=be, device=device)


def shutdown(exit_code: int | None = None) -> None:
    """Leave the group; with exit_code, exit hard: gloo aborts at interpreter exit in some runs
    even after destroy_process_group(), while os._exit after it never did (torch-on-cpu.md)."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except Exception:
            pass
        dist.destroy_process_group()
    if exit_code is not None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
