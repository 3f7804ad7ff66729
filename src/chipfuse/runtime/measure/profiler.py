"""Measure this machine's devices and a model's layers, for the planner (chipfuse.plan.profile).

What is measured, all with one thread per worker as the runtime runs:
- matmul FLOP/s per dtype and memory bandwidth (a large copy) of this host;
- point-to-point and all-reduce bandwidth between two worker processes on gloo;
- one transformer block's forward and backward seconds per micro-batch, and the head's, for the
  model, on every device of the pool. An emulated device is measured by running the block under
  the same Pacer the runtime uses (so the figure is what that device takes in a job); a real CPU
  device is timed as is. Devices of another kind than this host (a GPU named in a pool on a
  CPU-only machine) cannot be measured here and are left to catalog figures.

Written by hand: torch has benchmark utilities but no notion of emulated chips or plans.
"""

from __future__ import annotations

import functools
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chipfuse import devices
from chipfuse.cluster.pool import Device, Pool
from chipfuse.model.build import build_full, build_stage
from chipfuse.model.gpt import loss_sum
from chipfuse.model.registry import family_of
from chipfuse.model.spec import ModelSpec
from chipfuse.plan.plan import Stage
from chipfuse.runtime.emulate.device import Pacer, solo_time


@dataclass(frozen=True, kw_only=True)
class HostFigures:
    flops: dict[str, float]
    """dtype -> matmul FLOP/s of one thread."""
    mem_bw: float
    """Bytes/s of a large copy (read + write)."""


def host_figures(*, n: int = 512, copy_bytes: int = 64 << 20, repeats: int = 5) -> HostFigures:
    flops = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        flops[name] = 2 * n**3 / solo_time(functools.partial(torch.matmul, a, b), repeats=repeats)
    src = torch.empty(copy_bytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    mem_bw = 2 * copy_bytes / solo_time(lambda: dst.copy_(src), repeats=repeats)
    return HostFigures(flops=flops, mem_bw=mem_bw)


GEMM_SIZES = (64, 128, 256, 512, 1024)


def gemm_curve(dtype: str = "fp32", *, sizes: tuple[int, ...] = GEMM_SIZES, repeats: int = 3) -> list[tuple[int, float]]:
    """(n, FLOP/s) of n x n x n matmuls on this host (one thread): the GEMM efficiency curve the planner
    scales measured block times with (plan.profile.gemm_scale)."""
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    out = []
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
        out.append((n, 2 * n**3 / solo_time(functools.partial(torch.matmul, a, b), repeats=repeats)))
    return out


def runtime_bytes() -> tuple[str, int] | None:
    """(torch device type, bytes) the accelerator runtime itself takes on this host's first device
    (context, BLAS workspace after a matmul), or None on a host without one: the device's total
    minus what is free, read through its kind (chipfuse.devices), minus what tensors hold."""
    acc = [(t, k) for t in devices.host_devices() if t != devices.CPU and (k := devices.kind_of_type(t))]
    if not acc:
        return None
    torch_type, kind = acc[0]
    a = torch.randn(256, 256, device=torch.device(torch_type, 0))
    (a @ a).sum().item()  # loads the BLAS library and its workspace
    free, total = kind.read_memory(0)
    return torch_type, int(total - free - torch.accelerator.memory_allocated(0))


def _stage_timer(spec: ModelSpec, stage: Stage, index: int, stages: tuple[Stage, ...], mbs: int, seq_len: int):  # type: ignore[no-untyped-def]
    """A function running one forward and backward of one stage; returns (fwd_s, bwd_s) of that run."""
    module = build_stage(spec, stages, index, full=build_full(spec, 0))
    first, last = index == 0, index == len(stages) - 1
    x = (torch.randint(0, spec.vocab_size, (mbs, seq_len)) if first
         else torch.randn(mbs, seq_len, spec.dim, requires_grad=True))
    tgt = torch.randint(0, spec.vocab_size, (mbs, seq_len))

    def run(pacers: tuple[Pacer, Pacer] | None) -> tuple[float, float]:
        t0 = time.perf_counter()
        y = module(x)
        if pacers:
            pacers[0].pad(t0, 1)
        t1 = time.perf_counter()
        (loss_sum(y, tgt) if last else (y * torch.ones_like(y)).sum()).backward()
        if pacers:
            pacers[1].pad(t1, 1)
        t2 = time.perf_counter()
        module.zero_grad(set_to_none=True)
        return t1 - t0, t2 - t1

    return run


def block_and_head_times(spec: ModelSpec, pool: Pool, *, micro_batch_sizes: tuple[int, ...], seq_len: int,
                         slack: float = 1.1, repeats: int = 5, rounds: int = 4) -> dict[str, dict]:
    """device -> {"blocks": [{micro_batch_size, seq_len, fwd_s, bwd_s}], "head": [...]}: one block
    (a middle stage of one layer) and the last stage's extra (norm, head and loss), per device."""
    L = spec.num_layers
    if L < 3:
        raise ValueError(f"model {spec.name!r} has {L} layers; profiling needs 3 or more")
    # A middle stage of exactly one block (no embedding, no head), and a last stage of one block
    # (block + norm + head + loss): their difference is the head's time.
    mid = (Stage(devices=("x",), first_layer=0, num_layers=1), Stage(devices=("y",), first_layer=1, num_layers=1),
           Stage(devices=("z",), first_layer=2, num_layers=L - 2))
    stages = (Stage(devices=("x",), first_layer=0, num_layers=L - 1), Stage(devices=("z",), first_layer=L - 1, num_layers=1))
    out: dict[str, dict] = {d.name: {"blocks": [], "head": []} for d in _measurable(pool)}
    timers = {m: (_stage_timer(spec, mid[1], 1, mid, m, seq_len),
                  _stage_timer(spec, stages[1], 1, stages, m, seq_len))  # block; block + norm + head + loss
              for m in micro_batch_sizes}
    # The host's own time: the best of several rounds spread over time, every size in each round,
    # since other processes on the machine only ever add to it.
    host: dict[int, list[tuple[tuple[float, float], tuple[float, float]]]] = {m: [] for m in micro_batch_sizes}
    for _ in range(rounds):
        for m, (block, last) in timers.items():
            block(None), last(None)  # warm-up
            host[m] += [(block(None), last(None)) for _ in range(repeats)]
    for mbs in micro_batch_sizes:
        block, last = timers[mbs]
        f_b, b_b = min(t[0][0] for t in host[mbs]), min(t[0][1] for t in host[mbs])
        f_l, b_l = min(t[1][0] for t in host[mbs]), min(t[1][1] for t in host[mbs])
        for d in _measurable(pool):
            if d.emulation is None:
                fb, bb, fl, bl = f_b, b_b, f_l, b_l
            else:  # run under the runtime's own pacing: what this device takes in a job
                sp = d.emulation.speed
                runs_b = [block((Pacer(speed=sp, unit_s=f_b, slack=slack), Pacer(speed=sp, unit_s=b_b, slack=slack)))
                          for _ in range(repeats)]
                runs_l = [last((Pacer(speed=sp, unit_s=f_l, slack=slack), Pacer(speed=sp, unit_s=b_l, slack=slack)))
                          for _ in range(repeats)]
                # best run: padding sets the floor, other processes on the machine only add to it
                fb, bb = min(t[0] for t in runs_b), min(t[1] for t in runs_b)
                fl, bl = min(t[0] for t in runs_l), min(t[1] for t in runs_l)
            out[d.name]["blocks"].append({"micro_batch_size": mbs, "seq_len": seq_len, "fwd_s": fb, "bwd_s": bb})
            out[d.name]["head"].append({"micro_batch_size": mbs, "seq_len": seq_len,
                                        "fwd_s": max(0.0, fl - fb), "bwd_s": max(0.0, bl - bb)})
    return out


def _measurable(pool: Pool) -> list[Device]:
    """Devices this host can stand for: those whose worker runs on a CPU (emulated ones, and real
    devices of a CPU-backed kind)."""
    return [d for d in pool.devices if d.runs_as.torch_type == devices.CPU]


# ---------------------------------------------------------------------------------------------- links


LINK_SIZES = (4 << 10, 64 << 10, 1 << 20)
"""Message sizes the link curve is measured at (plus the large `nbytes`)."""


def _link_worker(rank: int, port: int, nbytes: int, repeats: int, q) -> None:  # type: ignore[no-untyped-def]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(devices.BRIDGE, rank=rank, world_size=2)
    big, small = torch.ones(nbytes // 4), torch.ones(2)

    def ping(t: torch.Tensor) -> None:
        if rank == 0:
            dist.send(t, 1)
            dist.recv(t, 1)
        else:
            dist.recv(t, 0)
            dist.send(t, 0)

    rtt_small = solo_time(lambda: ping(small), repeats=repeats * 4)
    rtt_big = solo_time(lambda: ping(big), repeats=repeats)
    rtts = {size: solo_time(functools.partial(ping, torch.ones(size // 4)), repeats=repeats) for size in LINK_SIZES}
    ar = solo_time(lambda: dist.all_reduce(big), repeats=repeats)
    if rank == 0:
        lat = rtt_small / 2
        # bandwidth by message size: what is left of each half round trip after the latency
        curve = [(size, size / max(1e-9, rtt / 2 - lat)) for size, rtt in sorted(rtts.items())]
        curve.append((nbytes, nbytes / max(1e-9, rtt_big / 2 - lat)))
        q.put({"latency_s": lat, "p2p_bandwidth": nbytes / max(1e-9, rtt_big / 2 - lat), "curve": curve,
               # ring all-reduce moves 2 (n-1)/n of the buffer per rank: bus bandwidth, as NCCL reports it
               "allreduce_bandwidth": nbytes / max(1e-9, ar - 2 * lat)})
    dist.barrier()
    dist.destroy_process_group()


def link_figures(*, nbytes: int = 4 << 20, repeats: int = 5) -> dict[str, float]:
    """Bandwidth (bytes/s) and latency between two worker processes of this host, over gloo."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [ctx.Process(target=_link_worker, args=(r, port, nbytes, repeats, q)) for r in range(2)]
    for p in procs:
        p.start()
    res = q.get(timeout=120)
    for p in procs:
        p.join(timeout=30)
    return res


def block_fwd_flops_per_token(spec: ModelSpec, seq_len: int) -> float:
    """Forward FLOPs of one block per token: the matmuls (2 per weight) and attention's two
    (T x T) products, halved by the causal mask."""
    c, f = spec.dim, spec.ffn
    if family_of(spec).gated_mlp_kernels:
        kv = spec.kv_heads * (c // spec.num_heads)
        weights = c * (c + 2 * kv) + c * c + 3 * c * f
    else:
        weights = 4 * c * c + 2 * c * f
    return 2 * weights + 2 * seq_len * c


def _closest(timings: list[dict], tokens: int) -> tuple[float, float]:
    """(fwd_s, bwd_s) for `tokens`, scaled linearly from the closest measured shape (as the planner)."""
    t = min(timings, key=lambda x: abs(x["micro_batch_size"] * x["seq_len"] - tokens))
    scale = tokens / (t["micro_batch_size"] * t["seq_len"])
    return t["fwd_s"] * scale, t["bwd_s"] * scale


def stage_targets(profile_path: str, device: str, stage: Stage, *, last: bool, micro_batch_size: int,
                  seq_len: int) -> tuple[float, float] | None:
    """Forward and backward seconds of one micro-batch of `stage` on `device` by the profile:
    its blocks, the head on the last stage, and a recomputed forward under checkpointing.

    In a stage group each device computes its own part, as the cost model prices it
    (plan.cost.block_time): 1/tp of every matmul, on micro_batch_size / data-degree rows. The
    group's collectives are real (gloo) and run inside the padded span, so an emulated group is
    not charged for them twice: the cost model adds them on top (docs/emulation.md)."""
    import json

    prof = json.loads(Path(profile_path).read_text())
    blocks = prof.get("layer_times", {}).get(device)
    if not blocks:
        return None
    tp = stage.tp_degree
    rows = math.ceil(micro_batch_size / stage.dp_degree)  # the data ranks split each micro-batch
    tokens = rows * seq_len
    f1, b1 = _closest(blocks, tokens)
    f, b = stage.num_layers * f1 / tp, stage.num_layers * b1 / tp
    if stage.checkpoint == "full":
        b += f
    elif stage.checkpoint == "selective":
        b += f / 2  # every other block re-runs its forward (runtime/parallel/checkpointing.py)
    heads = prof.get("head_times", {}).get(device)
    if last and heads:
        hf, hb = _closest(heads, tokens)
        f, b = f + hf / tp, b + hb / tp
    return f, b
