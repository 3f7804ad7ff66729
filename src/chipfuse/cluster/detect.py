"""Detect this machine's devices (CPU always; CUDA, MPS, XPU when present) and micro-benchmark them."""

from __future__ import annotations

import os
import platform
import time

import torch


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _mem_total() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


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
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def detect_devices(bench: bool = False) -> list[dict]:
    found: list[dict] = [{"device": "cpu", "kind": "cpu", "name": _cpu_name(), "memory_bytes": _mem_total(),
              "cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            found.append({"device": f"cuda:{i}", "kind": "cuda", "name": p.name, "memory_bytes": p.total_memory,
                          "cores": p.multi_processor_count})
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append({"device": "mps", "kind": "mps", "name": "Apple GPU", "memory_bytes": 0})
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        for i in range(torch.xpu.device_count()):
            found.append({"device": f"xpu:{i}", "kind": "xpu", "name": torch.xpu.get_device_name(i), "memory_bytes": 0})
    if bench:
        for d in found:
            if d["kind"] in ("cpu", "cuda"):
                d["fp32_flops"] = bench_matmul(d["device"])
                d["mem_bw"] = bench_memory(d["device"])
            else:
                d["fp32_flops"] = d["mem_bw"] = 0.0
    return found
