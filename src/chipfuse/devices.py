"""Device kinds: what a chip vendor's name means to every layer, in one table.

A pool file and the catalog name a chip's `vendor`; everything else chipfuse needs to know about
that kind of chip is a row here:

- `torch_type`: the torch device type its chips appear as (cuda, npu, mlu, ...), once `plugin`
  (the vendor's torch extension, e.g. torch_npu) is imported;
- `backend`: its native collective library as torch.distributed names it; the runtime falls back
  to `BRIDGE` (gloo, over host memory) where torch or the host lacks it, and between kinds;
- `read_memory`: (free, total) bytes of one of its devices on this host;
- `dtypes`: the 16-bit and narrower dtypes its chips have when a chip table says nothing;
- `kernel_reference`: the kernel model (plan.kernels) was calibrated on this kind's libraries.

Adding a kind is one `register_kind(...)` call (tests/test_devices.py registers a toy one from the
test file alone). Pool checking, planning, detection, process groups, the profiler and the
runtime's device choice all read this table; none of them names a vendor.

Nothing here imports torch at import time: plan/ reads this table and stays torch-free. The
functions that touch devices (host_devices, synchronize, the memory readers) import it when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

BRIDGE = "gloo"
"""The collective library every host has: it joins kinds (through host memory) and stands in for
a native library torch or the host lacks."""

CPU = "cpu"


def accelerator_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of this host's accelerator `index`, through torch.accelerator (any kind
    whose torch extension implements the accelerator API)."""
    import torch

    free, total = torch.accelerator.get_memory_info(index)
    return int(free), int(total)


def host_memory(index: int = 0) -> tuple[int, int]:
    """(free, total) bytes of this host's RAM (the memory of a CPU device), from /proc/meminfo."""
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                info[key] = int(rest.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        return 0, 0
    return info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0)


@dataclass(frozen=True, kw_only=True)
class DeviceKind:
    """One kind of chip, as every layer of chipfuse sees it."""

    vendor: str
    """The name pool files and the catalog write in `vendor = "..."`."""
    torch_type: str
    """torch device type of its chips: cuda, npu, mlu, hpu, ... or cpu."""
    backend: str
    """Native collective library, as torch.distributed names it (RCCL answers to "nccl")."""
    plugin: str | None = None
    """Python module that teaches torch this device type (torch_npu), imported before detecting."""
    read_memory: Callable[[int], tuple[int, int]] = accelerator_memory
    """(free, total) bytes of device `index` on this host."""
    dtypes: frozenset[str] = frozenset({"bf16", "fp16"})
    """Narrow dtypes its chips compute in, when a chip table does not say (`bf16 = false`)."""
    kernel_reference: bool = False
    """The kernel model's efficiencies were measured on this kind's libraries (others are scaled)."""

    @property
    def host_memory(self) -> bool:
        """Its device memory is the host's RAM (offloading to the host gains nothing)."""
        return self.torch_type == CPU


_KINDS: dict[str, DeviceKind] = {}


def register_kind(kind: DeviceKind) -> DeviceKind:
    """Add (or replace) a kind. Kinds of one torch device type must share a collective library:
    a process group is made per device type, so the library is a property of the type."""
    for other in _KINDS.values():
        if other.vendor != kind.vendor and other.torch_type == kind.torch_type and other.backend != kind.backend:
            raise ValueError(f"device kind {kind.vendor!r}: torch type {kind.torch_type!r} already uses backend "
                             f"{other.backend!r} (kind {other.vendor!r}), not {kind.backend!r}. Fix: give it "
                             f"backend={other.backend!r} or its own torch type")
    _KINDS[kind.vendor] = kind
    return kind


def unregister_kind(vendor: str) -> None:
    """Remove a kind (tests that register a toy kind take it out again)."""
    _KINDS.pop(vendor, None)


def kinds() -> tuple[DeviceKind, ...]:
    return tuple(_KINDS.values())


def vendors() -> tuple[str, ...]:
    """Every vendor name a chip table may use."""
    return tuple(_KINDS)


def kind_of(vendor: str) -> DeviceKind:
    """The kind of a vendor's chips. Chip tables are checked against vendors(), so an unknown
    vendor here is our own bug."""
    return _KINDS[vendor]


def kind_of_type(torch_type: str) -> DeviceKind | None:
    """The first registered kind of a torch device type (kinds of one type share their backend);
    None for a type no kind uses (mps: a host may have it, no pool names it)."""
    return next((k for k in _KINDS.values() if k.torch_type == torch_type), None)


def host_devices() -> dict[str, int]:
    """Devices this host has, per torch device type: its accelerator (torch.accelerator, after
    importing every kind's plugin) and the CPU, which every host has."""
    import importlib

    import torch

    for plugin in sorted({k.plugin for k in _KINDS.values() if k.plugin}):
        try:
            importlib.import_module(plugin)
        except ImportError:
            pass
    out = {CPU: 1 << 16}
    acc = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if acc is not None:
        out[acc.type] = torch.accelerator.device_count()
    return out


def synchronize(device: object) -> None:
    """Wait for `device`'s queued work (a torch.device); a CPU has none."""
    import torch

    assert isinstance(device, torch.device)
    if device.type != CPU:
        torch.accelerator.synchronize(device)


# The built-in kinds. Vendors whose chips run a CUDA-compatible torch build (ROCm for AMD and
# Hygon's DCU, Iluvatar's CoreX, MetaX's MACA) appear as "cuda" and answer to "nccl".
for _k in (
    DeviceKind(vendor="nvidia", torch_type="cuda", backend="nccl", kernel_reference=True),
    DeviceKind(vendor="amd", torch_type="cuda", backend="nccl"),
    DeviceKind(vendor="hygon", torch_type="cuda", backend="nccl"),
    DeviceKind(vendor="iluvatar", torch_type="cuda", backend="nccl"),
    DeviceKind(vendor="metax", torch_type="cuda", backend="nccl"),
    DeviceKind(vendor="huawei", torch_type="npu", backend="hccl", plugin="torch_npu"),
    # The catalog's Intel chips are Gaudi accelerators (habana_frameworks: "hpu", HCCL).
    DeviceKind(vendor="intel", torch_type="hpu", backend="hccl", plugin="habana_frameworks.torch"),
    DeviceKind(vendor="cambricon", torch_type="mlu", backend="cncl", plugin="torch_mlu"),
    DeviceKind(vendor="kunlunxin", torch_type="xpu", backend="bkcl", plugin="torch_xmlir"),
    DeviceKind(vendor="moore-threads", torch_type="musa", backend="mccl", plugin="torch_musa"),
    DeviceKind(vendor="enflame", torch_type="gcu", backend="eccl", plugin="torch_gcu"),
    DeviceKind(vendor="biren", torch_type="supa", backend="bccl", plugin="torch_supa"),
    DeviceKind(vendor="cpu", torch_type=CPU, backend=BRIDGE, read_memory=host_memory),
):
    register_kind(_k)
