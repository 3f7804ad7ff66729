"""The training loop. It only reads the plan: which device this rank is, what share of each
global batch it computes, in which micro-batches. Everything else is built by functions from it."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from chipfuse.cluster.pool import Device, Pool
from chipfuse.errors import ChipfuseError
from chipfuse.model.gpt import build_model
from chipfuse.plan.plan import Plan, Replica
from chipfuse.plan.shares import proportional_shares
from chipfuse.runtime import dist as cfdist
from chipfuse.runtime.data_parallel import DataParallelWorker
from chipfuse.runtime.emulate import MemoryMeter, Pacer, solo_time
from chipfuse.runtime.endure import Endurance, EndureConfig
from chipfuse.runtime.grad_sync import build_gradient_sync
from chipfuse.runtime.memory import (
    build_plan_optimizer,
    device_memory_config,
    device_state_tensors,
    prepare_replica,
)
from chipfuse.runtime.metrics import StepLog, gather_row


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    steps: int = 30
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    metrics_path: str | None = None
    """JSON-lines log of every step (rank 0 writes it)."""
    shares: str = "plan"
    """'plan': the plan's shares; 'measured': re-split the batch by speeds measured in a warm-up."""
    solo_samples: int = 8
    """Samples each device computes alone at start-up, for its standalone throughput (0: skip)."""
    slack: float = 1.1
    """Emulated devices pad each micro-batch to slack x solo time / speed (torch-on-cpu.md)."""
    progress: bool = True
    profile_path: str | None = None
    init_from: str | None = None
    """A Hugging Face folder each rank loads its own tensors from (chipfuse.model.weights)."""
    """A `chipfuse profile` JSON: pipeline workers pace emulated devices to its per-block times."""
    device: str | None = None
    """This worker's device name; None = the plan's device at this rank (single host)."""
    unit_s: float | None = None
    """Emulation: seconds per sample of an unslowed worker; None = measured at start-up, in turns."""
    endure: EndureConfig = field(default_factory=EndureConfig)
    """Checkpoints, resume, NaN policy, clean stop, online rebalancing (runtime/endure.py)."""


def _replica_of(plan: Plan, device: str) -> tuple[int, Replica]:
    for i, r in enumerate(plan.replicas):
        if device in r.devices:
            return i, r
    raise AssertionError(f"{device} is in no replica")


def _offsets(plan: Plan) -> list[int]:
    out, acc = [], 0
    for r in plan.replicas:
        out.append(acc)
        acc += r.batch_share
    return out


def _in_turns(info: cfdist.DistInfo, fn):  # type: ignore[no-untyped-def]
    """Run fn on one rank at a time (the others wait), so each measures its device undisturbed."""
    result = None
    for r in range(info.world_size):
        if r == info.rank:
            result = fn()
        if info.distributed:
            dist.barrier()
    return result


def _rank_names(name: str, info: cfdist.DistInfo) -> list[str]:
    """Every rank's device name, in rank order; each plan device exactly once."""
    names = [name]
    if info.distributed:
        names = [""] * info.world_size
        dist.all_gather_object(names, name)
    if sorted(names) != sorted(set(names)):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"devices {dup} were claimed by more than one worker. Fix: give each host its own "
                         "--pool-node, with --nproc-per-node equal to that node's devices in the plan")
    return names


def _all_gather_floats(values: list[float]) -> list[list[float]]:
    t = torch.tensor(values, dtype=torch.float64)
    if not dist.is_initialized():
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def run(plan: Plan, pool: Pool, cfg: TrainConfig) -> dict | None:
    """Train `plan` on this rank. Returns the run's summary on rank 0, None elsewhere."""
    kinds = [cfdist.torch_device_kind(pool.device(d)) for d in plan.devices]
    # Which device this worker is: given (multi-host: the node's devices by local rank, since c10d
    # rendezvous hands out global ranks in arrival order), or the plan's device at this rank.
    name = cfg.device or plan.devices[int(os.environ.get("RANK", 0))]
    info = cfdist.init(device_kind=cfdist.torch_device_kind(pool.device(name)),
                       backend="nccl" if all(k == "cuda" for k in kinds) else "gloo")
    if info.world_size != len(plan.devices):
        raise ValueError(f"the plan uses {len(plan.devices)} devices but {info.world_size} workers started. "
                         f"Fix: launch with --nproc-per-node {len(plan.devices)} (or use `chipfuse train`)")
    by_rank = _rank_names(name, info)
    if plan.sync.islands and not plan.is_pure_data_parallel:
        raise ChipfuseError("the plan has DiLoCo islands (sync.islands) and pipeline or tensor-parallel stages: "
                            "islands run on data-parallel replicas only so far. Fix: drop sync.islands or use "
                            "one device per replica (docs/slow_links.md)")
    if not plan.is_pure_data_parallel or plan.model.family != "gpt":
        from chipfuse.runtime.pipeline_train import run_pipeline  # stages over devices, HF models

        return run_pipeline(plan, pool, cfg, info, by_rank)
    device: Device = pool.device(name)
    idx, replica = _replica_of(plan, name)
    offsets = _offsets(plan)

    model = build_model(plan.model, seed=cfg.seed).to(info.device)
    mem = device_memory_config(plan, pool, name)  # this device's memory strategy (runtime.memory)
    prepare_replica(model, mem, device_name=name, device_type=info.device.type)
    params = list(model.parameters())
    meter = None
    if device.emulation and device.emulation.memory_bytes:
        meter = MemoryMeter(device_name=name, cap_bytes=device.emulation.memory_bytes)
        meter.set_static(device_state_tensors(model, None, offload=mem.offload), what="parameters")
    worker = DataParallelWorker(model=model, global_batch=plan.global_batch, seq_len=plan.seq_len,
                                offset=offsets[idx], share=replica.batch_share,
                                micro_batch_size=replica.micro_batch_size, device=info.device,
                                meter=meter, seed=cfg.seed)

    # ---- warm-up: each device's undisturbed time per sample, measured in turns
    mbs = replica.micro_batch_size

    def _probe() -> float:
        t = solo_time(lambda: worker.micro_batch_forward_backward(0, 0, mbs), repeats=3)
        model.zero_grad(set_to_none=True)
        return t / mbs

    # A given unit (benchmarks comparing runs) replaces the start-up measurement, which moves with load.
    unit_s = cfg.unit_s or _in_turns(info, _probe)
    assert unit_s is not None
    speed = device.emulation.speed if device.emulation else 1.0
    if device.emulation:
        worker.pacer = Pacer(speed=speed, unit_s=unit_s, slack=cfg.slack)
    eff_s = worker.pacer.target_s(1) if worker.pacer else unit_s  # seconds per sample as the chip runs

    # ---- standalone throughput of each device, same recipe, measured in turns (no weight update)
    solo_tps = 0.0
    if cfg.solo_samples:
        def _solo() -> float:
            t0 = time.perf_counter()
            done = 0
            while done < cfg.solo_samples:
                n = min(mbs, cfg.solo_samples - done)
                t_mb = time.perf_counter()
                worker.micro_batch_forward_backward(0, 0, n)
                if worker.pacer:
                    worker.pacer.pad(t_mb, n)
                done += n
            model.zero_grad(set_to_none=True)
            return cfg.solo_samples * plan.seq_len / (time.perf_counter() - t0)

        solo_tps = _in_turns(info, _solo) or 0.0
    gathered = _all_gather_floats([eff_s, solo_tps])
    eff = {d: g[0] for d, g in zip(by_rank, gathered, strict=True)}
    solo = {d: g[1] for d, g in zip(by_rank, gathered, strict=True)}

    shares = {r.devices[0]: r.batch_share for r in plan.replicas}
    if cfg.shares == "measured" and plan.is_pure_data_parallel:
        shares = proportional_shares({d: 1.0 / eff[d] for d in plan.devices}, plan.global_batch)
        start = 0
        for d in plan.devices:
            if d == name:
                worker.set_share(offset=start, share=shares[d])
            start += shares[d]

    optimizer = build_plan_optimizer(params, mem, plan=plan, lr=cfg.lr, weight_decay=cfg.weight_decay)
    endure = Endurance(cfg.endure, plan=plan, rank_names=by_rank, name=name, worker=worker, shares=shares)
    first_step = endure.resume(model, optimizer, cfg.steps)
    # plan.sync: one all-reduce per step, or islands with DiLoCo between them (docs/slow_links.md)
    grad_sync = build_gradient_sync(plan, pool, params, rank=info.rank, rank_devices=by_rank,
                                    share_fn=lambda: worker.share)
    log = StepLog(devices=by_rank, seq_len=plan.seq_len, emulated=pool.emulated, append=first_step > 0,
                  path=Path(cfg.metrics_path) if info.is_main and cfg.metrics_path else None)
    progress = _Progress(enabled=info.is_main and cfg.progress, steps=cfg.steps, devices=list(plan.devices))

    for step in range(first_step, cfg.steps):
        t_step = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        res = worker.compute(step)
        t_comm = time.perf_counter()
        grad_sync.reduce()
        comm_s = time.perf_counter() - t_comm
        if endure.before_update(step, res.loss_sum):  # False: non-finite loss, update skipped
            optimizer.step()
        t_outer = time.perf_counter()
        grad_sync.after_step()  # counted even when the update was skipped: islands stay in step
        comm_s += time.perf_counter() - t_outer
        if meter is not None:
            meter.set_static(device_state_tensors(model, optimizer, offload=mem.offload),
                             what="parameters, gradients and optimizer state")
        row = gather_row({"loss_sum": res.loss_sum, "samples": res.samples, "compute_s": res.compute_s,
                          "padded_s": res.padded_s, "comm_s": comm_s, "step_s": time.perf_counter() - t_step})
        extra = endure.after_step(step, row)
        if info.is_main:
            progress.update(log.add(step, row, **extra))
        if endure.stopping:
            break
    grad_sync.finish()
    progress.close()
    endure.finish(step + 1)

    if not info.is_main:
        return None
    tps = log.steady_tokens_per_s()
    solo_sum = sum(solo.values())
    return {
        "emulated": pool.emulated,
        "pool": pool.name,
        "model": plan.model.name,
        "num_params": sum(p.numel() for p in params),
        "strategy": plan.strategy,
        "steps": cfg.steps,
        "global_batch": plan.global_batch,
        "seq_len": plan.seq_len,
        "shares": endure.shares,
        "micro_batch_size": {r.devices[0]: r.micro_batch_size for r in plan.replicas},
        "initial_loss": log.rows[0]["loss"],
        "final_loss": log.rows[-1]["loss"],
        "tokens_per_s": tps,
        "measured_step_s": log.steady_step_s(),
        "solo_tokens_per_s": solo,
        "fusion_efficiency": tps / solo_sum if solo_sum else None,
        "devices": {
            d: {"chip": pool.device(d).chip.name,
                "speed": _speed(pool.device(d)),
                "seconds_per_sample": eff[d],
                "tokens_per_s": sum(r["devices"][d]["samples"] for r in log.rows[2:] or log.rows) * plan.seq_len
                / max(1e-9, sum(r["devices"][d]["compute_s"] for r in log.rows[2:] or log.rows)),
                "wait_s_mean": sum(r["devices"][d]["wait_s"] for r in log.rows) / len(log.rows)}
            for d in plan.devices
        },
        "metrics_path": cfg.metrics_path,
        "sync": grad_sync.describe(),
        **endure.summary(),
    }


def _speed(device: Device) -> float | None:
    return device.emulation.speed if device.emulation else None


class _Progress:
    """A rich progress bar with loss and tokens/s per device (rank 0 only)."""

    def __init__(self, *, enabled: bool, steps: int, devices: list[str]):
        self.enabled = enabled
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), transient=False)
        self.task = self.bar.add_task("", total=steps)
        self.bar.start()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        per = " ".join(f"{d} {v['tokens_per_s'] / 1e3:.1f}k" for d, v in row["devices"].items())
        self.bar.update(self.task, advance=1,
                        description=f"loss {row['loss']:.3f} | {row['tokens_per_s'] / 1e3:.1f}k tok/s | {per}")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()
