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


# torch device type of each vendor's chips (what torch.accelerator reports on a host that has them).
DEVICE_TYPE = {"nvidia": "cuda", "amd": "cuda", "huawei": "npu", "intel": "hpu", "apple": "mps",
               "cambricon": "mlu", "cpu": "cpu"}


def device_type_of(device: object) -> str:
    """The torch device type a pool device runs on: its vendor's for a real chip; 'cpu' for an
    emulated one (its speed is rehearsed on this CPU, not real)."""
    if getattr(device, "emulated", True):
        return "cpu"
    return DEVICE_TYPE.get(getattr(device, "vendor", "cpu"), getattr(device, "vendor", "cpu"))


def host_devices() -> dict[str, int]:
    """Devices this host has, per torch device type: its accelerator (torch.accelerator: cuda, xpu,
    npu with torch_npu imported, mps...) and the CPU, which every host has."""
    out = {"cpu": 1 << 16}
    try:
        import torch_npu  # type: ignore[import-not-found]  # noqa: F401  registers "npu" with torch.accelerator
    except ImportError:
        pass
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is not None:
        out[acc.type] = torch.accelerator.device_count()
    return out


def torch_device_kind(device: object) -> str:
    """The device type this worker uses for a pool device: device_type_of, or 'cpu' when this host
    lacks that accelerator (the launcher refuses such plans first: Topology.check_host)."""
    kind = device_type_of(device)
    return kind if host_devices().get(kind, 0) > 0 else "cpu"


def mesh_device_type(device: object) -> str:
    """Device type for a DeviceMesh over a stage group (the group's collectives run there)."""
    return torch_device_kind(device)


def native_backend(device_type: str) -> str:
    """The collective library of a device type, when torch has it on this host, else gloo."""
    from chipfuse.runtime.sync.groups import usable_backend

    native = {"cuda": "nccl", "xpu": "xccl", "npu": "hccl", "hpu": "hccl"}.get(device_type, "gloo")
    return usable_backend(native)


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
    the speed ratios they should show invert (docs/emulation.md, "Facts measured on CPU").
    """
    if threads:
        torch.set_num_threads(threads)
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu")
    if device_kind != "cpu":
        # One rank per chip: the local rank picks the chip of this host (torch.accelerator API).
        device = torch.device(device_kind, local % max(1, torch.accelerator.device_count()))
        torch.accelerator.set_device_index(device.index)
    # The native library only when every rank is one kind of accelerator; a fused job (CPU + GPU,
    # or two vendors) talks gloo over host memory, with native subgroups made by the topology.
    be = backend or native_backend(device.type)
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
