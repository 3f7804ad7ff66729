"""Detect this machine's devices (CPU always; the host's accelerator, whichever device kind's torch
extension is installed: chipfuse.devices) and micro-benchmark them."""

from __future__ import annotations

import os
import platform
import time

import torch

from chipfuse import devices


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def bench_matmul(device: str, dtype: torch.dtype = torch.float32, n: int = 512, seconds: float = 0.3) -> float:
    """Sustained FLOP/s of an n x n matmul on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _sync(device)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def bench_memory(device: str, nbytes: int = 64 << 20, seconds: float = 0.2) -> float:
    """Copy bandwidth (bytes read + written per second)."""
    x = torch.empty(nbytes // 4, device=device)
    y = torch.empty_like(x)
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        y.copy_(x)
        reps += 1
    _sync(device)
    return 2 * nbytes * reps / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    devices.synchronize(torch.device(device))


def _accelerator(torch_type: str, index: int) -> dict:
    """One accelerator's row: the name and core count its torch module reports where it has
    get_device_properties (cuda, xpu, npu, mlu...), and its memory through its kind."""
    props = getattr(getattr(torch, torch_type, None), "get_device_properties", None)
    p = props(index) if props is not None else None
    kind = devices.kind_of_type(torch_type)
    total = kind.read_memory(index)[1] if kind is not None else getattr(p, "total_memory", 0)
    return {"device": f"{torch_type}:{index}", "kind": torch_type, "name": getattr(p, "name", torch_type),
            "memory_bytes": total, "cores": getattr(p, "multi_processor_count", "")}


def detect_devices(bench: bool = False) -> list[dict]:
    found: list[dict] = [{"device": "cpu", "kind": "cpu", "name": _cpu_name(), "memory_bytes": devices.host_memory()[1],
              "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}]
    for torch_type, count in devices.host_devices().items():
        if torch_type != devices.CPU:
            found.extend(_accelerator(torch_type, i) for i in range(count))
    if bench:
        for d in found:
            d["fp32_flops"] = bench_matmul(d["device"])
            d["mem_bw"] = bench_memory(d["device"])
    return found
