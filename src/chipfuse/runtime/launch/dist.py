"""Process-group set-up that works the same under torchrun and as a single process."""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from chipfuse import devices
from chipfuse.cluster.pool import Device


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


def device_type_of(device: Device) -> str:
    """The torch device type a pool device runs on: its kind's for a real chip; 'cpu' for an
    emulated one (its speed is rehearsed on this CPU, not real)."""
    return device.runs_as.torch_type


def host_devices() -> dict[str, int]:
    """Devices this host has, per torch device type (chipfuse.devices.host_devices)."""
    return devices.host_devices()


def torch_device_kind(device: Device) -> str:
    """The device type this worker uses for a pool device: device_type_of, or 'cpu' when this host
    lacks that accelerator (the launcher refuses such plans first: Topology.check_host)."""
    kind = device_type_of(device)
    return kind if host_devices().get(kind, 0) > 0 else "cpu"


def mesh_device_type(device: Device) -> str:
    """Device type for a DeviceMesh over a stage group (the group's collectives run there)."""
    return torch_device_kind(device)


def usable_backend(native: str) -> str:
    """A native collective library when torch has it and this host has a device of a kind that
    uses it; else the bridge (gloo, always there)."""
    if native == devices.BRIDGE:
        return native
    try:
        ok = dist.is_backend_available(native)
    except Exception:
        ok = False
    host = host_devices()
    ok = ok and any(host.get(k.torch_type, 0) > 0 for k in devices.kinds() if k.backend == native)
    return native if ok else devices.BRIDGE


def device_backend(device: Device) -> str:
    """The collective library a pool device's worker uses inside a group of its own kind (an
    emulated device: the CPU's)."""
    return usable_backend(device.runs_as.backend)


def vendor_backends(pool_devices: Iterable[Device]) -> dict[str, str]:
    """Vendor -> native library its workers' groups use (runtime.sync.groups): the kind's own, or
    the bridge where any of its devices is emulated (their tensors live in host memory)."""
    out: dict[str, str] = {}
    for d in pool_devices:
        mine = d.runs_as.backend
        out[d.vendor] = mine if out.get(d.vendor, mine) == mine else devices.BRIDGE
    return out


def native_backend(device_type: str) -> str:
    """The collective library of a torch device type, when torch has it on this host, else gloo."""
    kind = devices.kind_of_type(device_type)
    return usable_backend(kind.backend) if kind is not None else devices.BRIDGE


def collective_timeout(default_s: float = 60.0) -> datetime.timedelta:
    """How long any collective waits before giving up (a link down, a peer hung): the run then
    stops, named, instead of waiting forever (docs/endure.md). Give it to every group created
    (`dist.new_group` does not inherit the default group's timeout). Tests shorten it with
    CHIPFUSE_COLLECTIVE_TIMEOUT_S."""
    return datetime.timedelta(seconds=float(os.environ.get("CHIPFUSE_COLLECTIVE_TIMEOUT_S", default_s)))


LOCAL_ADDR = "127.0.0.1"


def rendezvous(world_size: int, *, addr: str = LOCAL_ADDR) -> tuple[dist.TCPStore, dict[str, str]]:
    """Where a job's workers meet, for a launcher that starts them itself (training's supervisor,
    serving's engine): a store hosted by the launching process on a port the OS picks when it binds,
    as torchrun's agent hosts its own (a port chosen first and bound later can be taken in between
    on a busy host), and torchrun's environment naming it, which `init` reads on every worker.
    Keep the store alive while the workers run. `addr`: where workers reach the launcher; this host
    only for now (the workers are its subprocesses)."""
    store = dist.TCPStore(addr, 0, is_master=True, wait_for_workers=False)
    env = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": addr, "MASTER_PORT": str(store.port),
           "TORCHELASTIC_USE_AGENT_STORE": "True"}
    return store, env


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
